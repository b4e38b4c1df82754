from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mautrix.types import RoomID, UserID
from mautrix.util.async_db import Connection, Database

from . import dmcache, hot
from .dmcache import DMCache
from .message import SentMessage
from .sqlite import POINT_READ

CREATING, ACTIVE, ENDED = "creating", "active", "ended"
DECLINED = "declined"  # the user turned the contact down: nothing is sent until they reach out
JOINING = "joining"  # the user invited the ghost; the ghost is joining
ABANDONED = ""  # the instance of a claim whose request gave up: any process may recover it


@dataclass(frozen=True)
class DMRecord:
    """A DM row with what the homeserver last told us about its members."""

    ghost_id: UserID
    user_id: UserID
    network: str
    remote_id: str
    room_id: RoomID | None
    state: str
    claim: str | None
    updated_at: int
    user_membership: str | None
    ghost_membership: str | None
    others_joined: int
    ghost_displayname: str | None
    reason: str | None
    user_displayname: str | None
    ghost_avatar_url: str | None = None
    instance: str | None = None  # the process holding a 'creating' claim


_COLUMNS = """
    dm.ghost_id, dm.user_id, dm.network, dm.remote_id, dm.room_id, dm.state, dm.claim,
    dm.updated_at, u.membership AS user_membership, g.membership AS ghost_membership,
    (SELECT COUNT(*) FROM room_member o
      WHERE o.room_id = dm.room_id AND o.membership = 'join'
        AND o.user_id <> dm.ghost_id AND o.user_id <> dm.user_id) AS others_joined,
    gh.displayname AS ghost_displayname, dm.reason, u.displayname AS user_displayname,
    gh.avatar_url AS ghost_avatar_url, dm.instance
"""
_JOINS = """
    LEFT JOIN room_member u ON u.room_id = dm.room_id AND u.user_id = dm.user_id
    LEFT JOIN room_member g ON g.room_id = dm.room_id AND g.user_id = dm.ghost_id
    LEFT JOIN ghost gh ON gh.user_id = dm.ghost_id
"""
_SELECT = f"SELECT {_COLUMNS} FROM dm {_JOINS}"
# The pair's current DM and, in the same round trip, whether this message was already sent.
_FOR_SEND = POINT_READ + f"""
    SELECT {_COLUMNS}, sm.room_id AS sent_room_id, sm.event_id AS sent_event_id,
           sm.kind AS sent_kind
      FROM (SELECT CAST($1 AS TEXT) AS ghost_id, CAST($2 AS TEXT) AS user_id) AS pair
      LEFT JOIN dm ON dm.ghost_id = pair.ghost_id AND dm.user_id = pair.user_id
                  AND dm.state <> 'ended'
      {_JOINS}
      LEFT JOIN sent_message sm
             ON sm.network = $3 AND sm.remote_id = $4 AND sm.message_id = $5
"""
# The same question when the pair's DM is known from the cache (SQLite only), with SQLite's
# data_version, which moves when another process (``dmbridge forget``) commits to the file.
_SENT = POINT_READ + """
    SELECT (SELECT data_version FROM pragma_data_version) AS data_version,
           sm.room_id AS sent_room_id, sm.event_id AS sent_event_id, sm.kind AS sent_kind
      FROM (SELECT 1) AS one
      LEFT JOIN sent_message sm
             ON sm.network = $1 AND sm.remote_id = $2 AND sm.message_id = $3
"""


_CLAIM = (
    "INSERT INTO dm (ghost_id, user_id, network, remote_id, state, claim, instance,"
    " created_at, updated_at) VALUES ($1, $2, $3, $4, 'creating', $5, $6, $7, $7)"
    " ON CONFLICT (ghost_id, user_id) WHERE state <> 'ended' DO NOTHING RETURNING claim"
)
_ACTIVATE = (
    "UPDATE dm SET room_id=$4, state='active', claim=NULL, instance=NULL, updated_at=$5"
    " WHERE ghost_id=$1 AND user_id=$2 AND state='creating' AND claim=$3 RETURNING room_id"
)


def _record(row: Any) -> DMRecord:
    fields = {k: row[k] for k in DMRecord.__dataclass_fields__}
    return DMRecord(**{**fields, "others_joined": int(row["others_joined"] or 0)})


def _sent_of(row: Any) -> SentMessage | None:
    if row is None or row["sent_event_id"] is None:
        return None
    return SentMessage(row["sent_room_id"], row["sent_event_id"], row["sent_kind"])


class DMStore:
    """The ``dm`` table; every write names what it changes to the :class:`DMCache`."""

    def __init__(self, db: Database, cache: DMCache) -> None:
        self.db = db
        self.cache = cache

    async def get_current(self, ghost_id: UserID, user_id: UserID) -> DMRecord | None:
        row = await self.db.fetchrow(
            _SELECT + " WHERE dm.ghost_id=$1 AND dm.user_id=$2 AND dm.state <> 'ended'",
            ghost_id, user_id,
        )
        return _record(row) if row else None

    async def get_for_send(
        self, ghost_id: UserID, user_id: UserID, network: str, remote_id: str, message_id: str
    ) -> tuple[DMRecord | None, SentMessage | None]:
        """One round trip for the hot path: the pair's DM (on SQLite from the cache if it is
        there), and this message if already sent."""
        record = self.cache.get(ghost_id, user_id)
        if record is not None:
            row = await hot.fetchrow(self.db, _SENT, network, remote_id, message_id)
            # Kept only if no other process has committed since (then it is read again).
            self.cache.saw_data_version(int(row["data_version"]))
            if self.cache.get(ghost_id, user_id) is record:
                return record, _sent_of(row)
        read_at = self.cache.version
        row = await hot.fetchrow(self.db, _FOR_SEND, ghost_id, user_id, network, remote_id,
                                 message_id)
        assert row is not None  # the pair subquery always yields one row
        record = _record(row) if row["ghost_id"] is not None else None
        if record is not None and record.state == ACTIVE:
            self.cache.fill(record, read_at)
        return record, _sent_of(row)

    async def get_by_room(self, room_id: RoomID) -> DMRecord | None:
        row = await self.db.fetchrow(_SELECT + " WHERE dm.room_id=$1", room_id)
        return _record(row) if row else None

    async def of_user(self, user_id: UserID) -> list[DMRecord]:
        """Every DM row of a Matrix user, whatever its state."""
        rows = await self.db.fetch(_SELECT + " WHERE dm.user_id=$1", user_id)
        return [_record(row) for row in rows]

    async def of_ghost(self, ghost_id: UserID) -> list[DMRecord]:
        """Every DM row of a ghost, whatever its state."""
        rows = await self.db.fetch(_SELECT + " WHERE dm.ghost_id=$1", ghost_id)
        return [_record(row) for row in rows]

    async def unfinished(self) -> list[DMRecord]:
        """Every pair whose room is being created (or was, by a process that died)."""
        rows = await self.db.fetch(_SELECT + " WHERE dm.state = 'creating'")
        return [_record(row) for row in rows]

    async def rooms_of_ghost(self, ghost_id: UserID) -> set[RoomID]:
        """Every room this ghost has a DM row for, whatever its state."""
        rows = await self.db.fetch(
            "SELECT room_id FROM dm WHERE ghost_id=$1 AND room_id IS NOT NULL", ghost_id)
        return {RoomID(row["room_id"]) for row in rows}

    @staticmethod
    async def by_room(conn: Connection, room_id: str) -> DMRecord | None:
        """The DM row of a room, whatever its state (by a unique key: a point read)."""
        row = await conn.fetchrow(POINT_READ + _SELECT + " WHERE dm.room_id=$1", room_id)
        return _record(row) if row else None

    async def in_room(self, conn: Connection, room_id: str) -> DMRecord | None:
        """The DM row of a room, whatever its state: from the cache when it can be trusted in
        the current transaction (SQLite, see :meth:`DMCache.in_room`), kept there when it is
        the pair's active DM."""
        record = self.cache.in_room(room_id)
        if record is not None:
            return record
        read_at = self.cache.version
        record = await self.by_room(conn, room_id)
        if record is not None and record.state == ACTIVE:
            self.cache.fill(record, read_at)
        return record

    @staticmethod
    async def current_in(conn: Connection, ghost_id: str, user_id: str) -> DMRecord | None:
        row = await conn.fetchrow(
            _SELECT + " WHERE dm.ghost_id=$1 AND dm.user_id=$2 AND dm.state <> 'ended'",
            ghost_id, user_id,
        )
        return _record(row) if row else None

    async def set_state(
        self, conn: Connection, room_id: str, state: str, reason: str, now_ms: int
    ) -> None:
        self.cache.changed(dmcache.room(room_id))
        await conn.execute(
            "UPDATE dm SET state=$2, reason=$3, claim=NULL, updated_at=$4 WHERE room_id=$1",
            room_id, state, reason, now_ms,
        )

    async def adopt(
        self, conn: Connection, ghost_id: str, user_id: str, network: str, remote_id: str,
        room_id: str, state: str, reason: str, now_ms: int,
    ) -> None:
        """Make ``room_id`` the pair's DM; the caller has ended the pair's previous one."""
        self.cache.changed(dmcache.pair(ghost_id, user_id), dmcache.room(room_id))
        await conn.execute(
            "INSERT INTO dm (ghost_id, user_id, network, remote_id, room_id, state, reason,"
            " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)"
            " ON CONFLICT (room_id) DO UPDATE SET state=excluded.state, reason=excluded.reason,"
            " claim=NULL, updated_at=excluded.updated_at",
            ghost_id, user_id, network, remote_id, room_id, state, reason, now_ms,
        )

    async def keep_ended(
        self, conn: Connection, ghost_id: str, user_id: str, network: str, remote_id: str,
        room_id: str, reason: str, now_ms: int,
    ) -> bool:
        """Record a room of the pair that is not its DM as ended, so what the user writes there
        still reaches the platform; False (nothing changed) if the room is recorded already,
        e.g. made the pair's DM by a recovery or a transaction running at the same time."""
        self.cache.changed(dmcache.pair(ghost_id, user_id), dmcache.room(room_id))
        got = await conn.fetchval(
            "INSERT INTO dm (ghost_id, user_id, network, remote_id, room_id, state, reason,"
            " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'ended', $6, $7, $7)"
            " ON CONFLICT (room_id) DO NOTHING RETURNING room_id",
            ghost_id, user_id, network, remote_id, room_id, reason, now_ms,
        )
        return got is not None

    async def find(
        self,
        *,
        network: str | None = None,
        user_id: UserID | None = None,
        ghost_id: UserID | None = None,
        limit: int = 100,
    ) -> list[DMRecord]:
        """The oldest active DMs matching every filter given, at most ``limit``."""
        if network is None and user_id is None and ghost_id is None:
            # One search of the listing index per network, merged: all networks at once
            # would sort every active DM.
            rows = [row for net in await self._active_networks()
                    for row in await self._find({"network": net}, limit)]
            rows.sort(key=lambda row: (row["created_at"], row["room_id"]))
            return [_record(row) for row in rows[:limit]]
        filters = {"network": network, "user_id": user_id, "ghost_id": ghost_id}
        return [_record(row) for row in await self._find(
            {k: v for k, v in filters.items() if v is not None}, limit)]

    async def _find(self, filters: dict[str, str], limit: int) -> list[Any]:
        # Only the filters given are in the statement. With a user or a ghost, the network is
        # compared as an expression, so that SQLite's planner (without statistics) searches
        # their few DMs rather than walking the network's whole listing index.
        narrow = "user_id" in filters or "ghost_id" in filters
        where = "".join(
            f" AND dm.network || '' = ${n}" if column == "network" and narrow
            else f" AND dm.{column} = ${n}" for n, column in enumerate(filters, 1))
        return await self.db.fetch(
            f"SELECT {_COLUMNS}, dm.created_at FROM dm {_JOINS} WHERE dm.state = 'active'"
            f"{where} ORDER BY dm.created_at, dm.room_id LIMIT ${len(filters) + 1}",
            *filters.values(), limit,
        )

    async def _active_networks(self) -> list[str]:
        """The networks with an active DM, one search of the listing index each."""
        rows = await self.db.fetch(
            "WITH RECURSIVE net(network) AS ("
            " SELECT MIN(network) FROM dm WHERE state = 'active'"
            " UNION ALL SELECT (SELECT MIN(network) FROM dm"
            "  WHERE state = 'active' AND network > net.network)"
            " FROM net WHERE net.network IS NOT NULL)"
            " SELECT network FROM net WHERE network IS NOT NULL")
        return [str(row["network"]) for row in rows]

    async def active_rooms_of_ghost(self, ghost_id: UserID) -> dict[UserID, list[RoomID]]:
        rows = await self.db.fetch(
            "SELECT user_id, room_id FROM dm WHERE ghost_id=$1 AND state='active'"
            " ORDER BY created_at",
            ghost_id,
        )
        rooms: dict[UserID, list[RoomID]] = {}
        for row in rows:
            rooms.setdefault(row["user_id"], []).append(row["room_id"])
        return rooms

    async def claim(
        self, ghost_id: UserID, user_id: UserID, network: str, remote_id: str, claim: str,
        instance: str, now_ms: int,
    ) -> bool:
        """Reserve the pair for a room about to be created; False if someone holds it.

        ``instance`` names this process, so others can tell whether the claim's holder lives.
        """
        async with self.cache.writing(self.db) as conn:
            self.cache.changed(dmcache.pair(ghost_id, user_id))
            got = await conn.fetchval(_CLAIM, ghost_id, user_id, network, remote_id, claim,
                                      instance, now_ms)
        return got is not None

    async def replace_with_claim(
        self, conn: Connection, room_id: RoomID, reason: str, claim: str, instance: str,
        now_ms: int,
    ) -> bool:
        """End the active DM ``room_id`` and claim its pair for a new room, in the caller's
        transaction; False (nothing changed) if that room is no longer the pair's active DM
        (another request replaced it, or the user declined or left meanwhile)."""
        self.cache.changed(dmcache.room(room_id))
        row = await conn.fetchrow(
            "UPDATE dm SET state='ended', reason=$2, claim=NULL, updated_at=$3"
            " WHERE room_id=$1 AND state='active' RETURNING ghost_id, user_id, network,"
            " remote_id",
            room_id, reason, now_ms,
        )
        if row is None:
            return False
        self.cache.changed(dmcache.pair(row["ghost_id"], row["user_id"]))
        got = await conn.fetchval(_CLAIM, row["ghost_id"], row["user_id"], row["network"],
                                  row["remote_id"], claim, instance, now_ms)
        return got is not None

    async def restore_replaced(self, room_id: RoomID, replaced_reason: str,
                               reason: str | None, now_ms: int) -> bool:
        """A replacement made no room: ``room_id`` is the pair's active DM again, unless the
        pair has another current DM by now."""
        async with self.cache.writing(self.db) as conn:
            self.cache.changed(dmcache.room(room_id))
            got = await conn.fetchval(
                "UPDATE dm SET state='active', reason=$3, updated_at=$4"
                " WHERE room_id=$1 AND state='ended' AND reason=$2 AND NOT EXISTS ("
                "  SELECT 1 FROM dm o WHERE o.ghost_id=dm.ghost_id AND o.user_id=dm.user_id"
                "   AND o.state <> 'ended') RETURNING room_id",
                room_id, replaced_reason, reason, now_ms,
            )
        return got is not None

    @staticmethod
    async def change_ended_reason(conn: Connection, room_id: RoomID, was: str, reason: str,
                                  now_ms: int) -> bool:
        """The ended DM ``room_id`` ended for ``reason`` after all; False if its reason was
        not ``was`` (changed already)."""
        got = await conn.fetchval(
            "UPDATE dm SET reason=$3, updated_at=$4 WHERE room_id=$1 AND state='ended'"
            " AND reason=$2 RETURNING room_id",
            room_id, was, reason, now_ms,
        )
        return got is not None

    async def ended_for(self, reason: str) -> list[DMRecord]:
        """The ended DMs with this reason."""
        rows = await self.db.fetch(_SELECT + " WHERE dm.state='ended' AND dm.reason=$1", reason)
        return [_record(row) for row in rows]

    async def ended_with_ghost_joined(self, reason: str) -> list[DMRecord]:
        """The ended DMs with this reason whose ghost is still in the room, as last seen."""
        rows = await self.db.fetch(
            _SELECT + " WHERE dm.state='ended' AND dm.reason=$1 AND g.membership='join'",
            reason,
        )
        return [_record(row) for row in rows]

    async def activate(
        self, ghost_id: UserID, user_id: UserID, claim: str, room_id: RoomID, now_ms: int
    ) -> bool:
        """The claimed pair's room is ``room_id``; True also if it was already recorded as
        the pair's active DM (adopted from the homeserver's transaction or by a recovery), not
        if it was kept as an ended room because another creation superseded this claim."""
        async with self.cache.writing(self.db) as conn:
            self.cache.changed(dmcache.pair(ghost_id, user_id), dmcache.room(room_id))
            got = await conn.fetchval(_ACTIVATE, ghost_id, user_id, claim, room_id, now_ms)
        if got is not None:
            return True
        mine = await self.db.fetchval(
            "SELECT room_id FROM dm WHERE room_id=$1 AND ghost_id=$2 AND user_id=$3"
            " AND state='active'",
            room_id, ghost_id, user_id,
        )
        return mine is not None

    async def abandon(self, ghost_id: UserID, user_id: UserID, claim: str) -> None:
        """The claim's request gave up mid-creation: the next request recovers it at once."""
        async with self.cache.writing(self.db) as conn:
            self.cache.changed(dmcache.pair(ghost_id, user_id))
            await conn.execute(
                "UPDATE dm SET instance=$4 WHERE ghost_id=$1 AND user_id=$2"
                " AND state='creating' AND claim=$3",
                ghost_id, user_id, claim, ABANDONED,
            )

    async def activate_in(self, conn: Connection, ghost_id: str, user_id: str, claim: str,
                          room_id: str, now_ms: int) -> bool:
        """As :meth:`activate`, inside the caller's transaction; False if the claim moved on."""
        self.cache.changed(dmcache.pair(ghost_id, user_id), dmcache.room(room_id))
        got = await conn.fetchval(_ACTIVATE, ghost_id, user_id, claim, room_id, now_ms)
        return got is not None

    async def release(self, ghost_id: UserID, user_id: UserID, claim: str) -> None:
        async with self.cache.writing(self.db) as conn:
            self.cache.changed(dmcache.pair(ghost_id, user_id))
            await conn.execute(
                "DELETE FROM dm WHERE ghost_id=$1 AND user_id=$2 AND state='creating'"
                " AND claim=$3",
                ghost_id, user_id, claim,
            )

    async def end(self, room_id: RoomID, now_ms: int) -> None:
        async with self.cache.writing(self.db) as conn:
            self.cache.changed(dmcache.room(room_id))
            await conn.execute(
                "UPDATE dm SET state='ended', updated_at=$2 WHERE room_id=$1 AND state='active'",
                room_id, now_ms,
            )

    async def count_by_state(self) -> dict[str, int]:
        """How many DM rows are in each state (for metrics; read from the dm_state index)."""
        rows = await self.db.fetch(
            "SELECT state || '' AS s, COUNT(*) AS n FROM dm GROUP BY state || ''")
        return {str(r["s"]): int(r["n"]) for r in rows}
