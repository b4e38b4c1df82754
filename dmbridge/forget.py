"""Forgetting a person: a Matrix user, or a network's remote user, and everything kept of them.

Works on the database directly, like ``clear-declined``, with or without the bridge running; the
ghost leaves the DM rooms through the homeserver. In order:

1. One transaction queues a ``dm.forgotten`` notice for each DM (the platform should forget
   its side too), deletes what was kept of the DMs (message maps, history, outbox items, ghost
   invites) and marks each room ended with the ghost gone, so that nothing the user does there
   meanwhile reaches the platform or revives the DM.
2. The ghost leaves and forgets each room, and takes it off its ``m.direct``.
3. Once a running bridge has recorded those leaves (waited for a few seconds), the rooms it
   left are deleted (DM rows, memberships), with whatever was queued meanwhile.
   A room the homeserver could not be asked about keeps its DM row (ended), so running the
   command again finishes the job.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mautrix.types import RoomID, UserID
from mautrix.util.async_db import Connection, Database

from . import payloads
from .config import Settings
from .db import Stores, create_database, dmcache, now_ms, start_database
from .db.dm import DMRecord
from .errors import BridgeError, InvalidParam, NotFound
from .ghostlock import GhostLocks
from .homeserver import Homeserver
from .networks import Network
from .outgoing import lane_of
from .startup import StartupError

log = logging.getLogger("dmbridge.forget")

_USER_ID = re.compile(r"@[\x21-\x39\x3b-\x7e]+:[A-Za-z0-9.\-\[\]:]+")
REASON = "forgotten_by_admin"

Leave = Callable[[UserID, RoomID], Awaitable[None]]
Reset = Callable[[UserID, str], Awaitable[None]]
# How long to wait for a running bridge to record the ghost's leaves, so that they are deleted
# with the rest instead of arriving afterwards.
SETTLE_S = 10.0


@dataclass(frozen=True)
class Subject:
    """Whom to forget: a Matrix user, or a remote user (``network``, ``remote_id``)."""

    user_id: UserID | None = None
    network: Network | None = None
    remote_id: str | None = None

    @classmethod
    def matrix_user(cls, user_id: str, bot_user_id: str, networks: list[Network]) -> Subject:
        if not _USER_ID.fullmatch(user_id) or len(user_id) > 255:
            raise InvalidParam(f"{user_id!r} is not a Matrix user ID (@user:server)")
        if user_id == bot_user_id or any(n.parse_ghost(user_id) is not None for n in networks):
            raise InvalidParam(f"{user_id} is a user of this bridge; forget the remote user"
                               " with --network and --remote-id")
        return cls(user_id=UserID(user_id))

    @classmethod
    def remote_user(cls, network: Network, remote_id: str) -> Subject:
        network.check_remote_id(remote_id)
        return cls(network=network, remote_id=remote_id)

    @property
    def ghost_id(self) -> UserID | None:
        if self.network is None or self.remote_id is None:
            return None
        return self.network.ghost_user_id(self.remote_id)

    def __str__(self) -> str:
        if self.user_id is not None:
            return self.user_id
        assert self.network is not None
        return f"{self.network.id} user {self.remote_id}"


@dataclass
class Forgotten:
    """What was (or would be) removed; counts per kind of row."""

    dms: list[DMRecord]
    counts: dict[str, int] = field(default_factory=dict)
    left: list[RoomID] = field(default_factory=list)
    failed: dict[RoomID, str] = field(default_factory=dict)
    notices: int = 0
    profile_error: str | None = None

    def rooms(self) -> list[RoomID]:
        return sorted({dm.room_id for dm in self.dms if dm.room_id is not None})


async def find(stores: Stores, subject: Subject) -> Forgotten:
    """The subject's DMs, in every state (declined, ended and being opened too); NotFound if
    the bridge knows nothing of them."""
    if subject.user_id is not None:
        records = await stores.dms.of_user(subject.user_id)
    else:
        assert subject.ghost_id is not None
        records = await stores.dms.of_ghost(subject.ghost_id)
    known = bool(records)
    if not known and subject.ghost_id is not None:
        known = await stores.ghosts.get(subject.ghost_id) is not None
    if not known:
        raise NotFound(f"the bridge knows nothing of {subject}: no DM, no ghost")
    return Forgotten(records)


# mautrix's crypto store: the room keys of encrypted DMs (which decrypt their messages).
CRYPTO_ROOM_TABLES = ("crypto_megolm_inbound_session", "crypto_megolm_outbound_session")


async def forget(stores: Stores, subject: Subject, leave: Leave, settle: float = SETTLE_S,
                 reset: Reset | None = None) -> Forgotten:
    """Forget ``subject`` (see the module's description); ``leave`` makes a ghost leave and
    forget a room, ``reset`` gives a forgotten remote user's ghost a plain name and no avatar.
    Raises NotFound for someone the bridge does not know."""
    done = await find(stores, subject)
    state_tables = await _state_tables(stores)
    seen = await _tell_and_end(stores, subject, done)
    for room_id in done.rooms():
        try:
            await leave(_ghost_of(done.dms, room_id), room_id)
        except Exception as e:  # the homeserver's answer or its absence: reported, kept
            done.failed[room_id] = str(e) or type(e).__name__
        else:
            done.left.append(room_id)
    await _settled(stores, {r: seen[r] for r in done.left if r in seen}, done.dms, settle,
                   "mx_user_profile" in state_tables)
    if reset is not None and subject.network is not None and subject.remote_id is not None:
        assert subject.ghost_id is not None
        try:
            await reset(subject.ghost_id,
                        subject.network.ghost_displayname(subject.remote_id, None))
        except Exception as e:
            done.profile_error = str(e) or type(e).__name__
    await _finish(stores, subject, done, state_tables)
    log.info("forgot %s: %s; the ghost left %d room(s)%s", subject,
             ", ".join(f"{k} {v}" for k, v in done.counts.items()), len(done.left),
             f", {len(done.failed)} could not be left" if done.failed else "")
    return done


async def _tell_and_end(stores: Stores, subject: Subject, done: Forgotten
                        ) -> dict[RoomID, str | None]:
    """Step 1: the notices, what was kept of the DMs, and the rooms ended with the ghost as
    good as gone (what the user writes now reaches nobody). Returns the ghost's last member
    event in each room it is still in, to tell when its leave has been recorded."""
    now = now_ms()
    seen: dict[RoomID, str | None] = {}
    conn: Connection
    async with stores.transaction() as conn:
        done.notices = await _tell(stores, conn, done.dms, now)
        done.counts = await _delete_kept(conn, subject, done.dms)
        for dm in done.dms:
            if dm.room_id is None:
                continue
            stores.dms.cache.changed(dmcache.pair(dm.ghost_id, dm.user_id),
                                     dmcache.room(dm.room_id))
            await conn.execute("UPDATE dm SET state='ended', reason=$2, claim=NULL, updated_at=$3"
                               " WHERE room_id=$1", dm.room_id, REASON, now)
            if dm.ghost_membership in ("join", "invite"):
                seen[dm.room_id] = await _ghost_event(conn, dm.room_id, dm.ghost_id)
            await conn.execute("UPDATE room_member SET membership='leave' WHERE room_id=$1"
                               " AND user_id=$2", dm.room_id, dm.ghost_id)
    return seen


async def _finish(stores: Stores, subject: Subject, done: Forgotten, state_tables: list[str]
                  ) -> None:
    """Step 3: the rooms the ghost left, what was added meanwhile, and the ghost once it is
    fully done with."""
    conn: Connection
    async with stores.transaction() as conn:
        again = await _delete_kept(conn, subject, done.dms)
        for kind, n in again.items():
            done.counts[kind] = done.counts.get(kind, 0) + n
        rooms = set(done.left)
        gone = [dm for dm in done.dms if dm.room_id is None or dm.room_id in rooms]
        for dm in gone:
            stores.dms.cache.changed(dmcache.pair(dm.ghost_id, dm.user_id),
                                     *([dmcache.room(dm.room_id)] if dm.room_id else []))
        done.counts["dm"] = await _delete_dms(conn, gone, state_tables)
        if subject.user_id is not None and "crypto_megolm_inbound_session" in state_tables:
            for table in ("crypto_device", "crypto_tracked_user"):  # the user's device keys
                await conn.execute(f"DELETE FROM {table} WHERE user_id=$1", subject.user_id)
        if not done.failed and done.profile_error is None and subject.ghost_id is not None:
            stores.dms.cache.changed(dmcache.ghost(subject.ghost_id))
            done.counts["ghost"], done.counts["media"] = await _delete_ghost(
                conn, subject.ghost_id)


async def _ghost_event(conn: Connection | Database, room_id: RoomID, ghost_id: UserID
                       ) -> str | None:
    value = await conn.fetchval("SELECT event_id FROM room_member WHERE room_id=$1 AND"
                                " user_id=$2", room_id, ghost_id)
    return str(value) if value is not None else None


async def _settled(stores: Stores, seen: dict[RoomID, str | None], dms: list[DMRecord],
                   wait: float, state_store: bool) -> None:
    """Wait (at most ``wait`` seconds) until the bridge has recorded the ghost's leave of each
    room: a new member event for it, in its own table and in mautrix's state store. Without a
    running bridge the leaves are recorded when it next starts, as memberships of rooms that are
    no DM."""
    deadline = time.monotonic() + wait
    waiting = dict(seen)
    while waiting and time.monotonic() < deadline:
        for room_id, before in list(waiting.items()):
            ghost_id = _ghost_of(dms, room_id)
            if await _ghost_event(stores.db, room_id, ghost_id) != before and (
                    not state_store or await stores.db.fetchval(
                        "SELECT membership FROM mx_user_profile WHERE room_id=$1 AND user_id=$2",
                        room_id, ghost_id) == "leave"):
                del waiting[room_id]
        if waiting:
            await asyncio.sleep(0.2)
    if waiting:
        log.info("the bridge has not recorded the ghost's leave of %d room(s) yet",
                 len(waiting))


def _ghost_of(dms: list[DMRecord], room_id: RoomID) -> UserID:
    return next(dm.ghost_id for dm in dms if dm.room_id == room_id)


async def _tell(stores: Stores, conn: Connection, dms: list[DMRecord], now: int) -> int:
    """One ``dm.forgotten`` per conversation (network, remote user, Matrix user), naming its
    current room (or its latest, when it has none open)."""
    latest: dict[tuple[str, str, str], DMRecord] = {}
    for dm in sorted(dms, key=lambda d: (d.state != "ended", d.updated_at)):
        latest[(dm.network, dm.remote_id, dm.user_id)] = dm
    queued = 0
    for dm in latest.values():
        payload = payloads.forgotten(lane_of(dm), dm.room_id, now)
        item = await stores.outbox.add(
            conn, network=dm.network, remote_id=dm.remote_id, user_id=dm.user_id,
            type=payloads.DM_FORGOTTEN, key=payload["idempotency_key"], payload=payload,
            now=now)
        queued += item is not None
    return queued


async def _delete_kept(conn: Connection, subject: Subject, dms: list[DMRecord]
                       ) -> dict[str, int]:
    """Everything kept of the subject's conversations but the DM rows and the notices."""
    counts = {"sent_message": 0, "matrix_message": 0, "dm_history": 0, "outbox": 0,
              "ghost_invite": 0, "undelivered_notice": 0}

    async def delete(table: str, where: str, *args: object) -> None:
        rows = await conn.fetch(f"DELETE FROM {table} WHERE {where} RETURNING 1", *args)
        counts[table] += len(rows)

    pairs = {(dm.network, dm.remote_id, dm.ghost_id, dm.user_id) for dm in dms}
    if subject.network is not None:  # everything the remote user sent, whoever to
        await delete("sent_message", "network=$1 AND remote_id=$2", subject.network.id,
                     subject.remote_id)
        await delete("ghost_invite", "ghost_id=$1", subject.ghost_id)
    else:
        for dm in dms:
            if dm.room_id is not None:
                await delete("sent_message", "network=$1 AND remote_id=$2 AND room_id=$3",
                             dm.network, dm.remote_id, dm.room_id)
        await delete("ghost_invite", "inviter=$1", subject.user_id)
    for room_id in sorted({dm.room_id for dm in dms if dm.room_id is not None}):
        await delete("undelivered_notice", "room_id=$1", room_id)
    for network, remote_id, ghost_id, user_id in sorted(pairs):
        await delete("matrix_message", "network=$1 AND remote_id=$2 AND user_id=$3",
                     network, remote_id, user_id)
        await delete("dm_history", "ghost_id=$1 AND user_id=$2", ghost_id, user_id)
        # Every state named, so that the outbox_lane index serves it (no scan of the outbox).
        await delete("outbox", "state IN ('pending', 'delivered', 'dead') AND network=$1 AND "
                     "remote_id=$2 AND user_id=$3 AND type<>$4",
                     network, remote_id, user_id, payloads.DM_FORGOTTEN)
    return counts


async def _state_tables(stores: Stores) -> list[str]:
    """mautrix's state store tables, and its crypto store's tables of room keys, where the
    bridge has created them (it does on start)."""
    found = []
    for table in ("mx_user_profile", "mx_room_state", *CRYPTO_ROOM_TABLES):
        try:
            await stores.db.fetchval(f"SELECT COUNT(*) FROM {table} WHERE 1=0")
        except Exception:
            continue
        found.append(table)
    return found


async def _delete_dms(conn: Connection, dms: list[DMRecord], state_tables: list[str]) -> int:
    """The DM rows, and what the bridge and mautrix recorded of their rooms' members."""
    deleted = 0
    for dm in dms:
        if dm.room_id is None:  # a creation in progress
            rows = await conn.fetch(
                "DELETE FROM dm WHERE ghost_id=$1 AND user_id=$2 AND room_id IS NULL"
                " RETURNING 1", dm.ghost_id, dm.user_id)
        else:
            rows = await conn.fetch("DELETE FROM dm WHERE room_id=$1 RETURNING 1", dm.room_id)
            for table in ("room_member", "ghost_invite", "encrypted_room", "undecrypted_event",
                          *state_tables):
                await conn.execute(f"DELETE FROM {table} WHERE room_id=$1", dm.room_id)
        deleted += len(rows)
    return deleted


async def _delete_ghost(conn: Connection, ghost_id: UserID) -> tuple[int, int]:
    """The ghost's row (its name and avatar), and its avatar's upload unless another ghost
    wears it too. The next message from the remote user registers it afresh."""
    avatar = await conn.fetchval("SELECT avatar_url FROM ghost WHERE user_id=$1", ghost_id)
    ghosts = await conn.fetch("DELETE FROM ghost WHERE user_id=$1 RETURNING 1", ghost_id)
    media = []
    if avatar:
        media = await conn.fetch(
            "DELETE FROM media WHERE content_uri=$1 AND NOT EXISTS"
            " (SELECT 1 FROM ghost WHERE avatar_url=$1) RETURNING 1", avatar)
    return len(ghosts), len(media)


async def command(settings: Settings, matrix_user: str | None, network_id: str | None,
                  remote_id: str | None, *, yes: bool) -> int:
    """``dmbridge forget``: asks first (unless ``yes``), prints what was removed; 1 on any
    failure, told in one line."""
    networks = list(settings.networks)
    try:
        if matrix_user is not None:
            subject = Subject.matrix_user(matrix_user, settings.bot_user_id, networks)
        else:
            assert network_id is not None and remote_id is not None
            subject = Subject.remote_user(settings.networks.get(network_id), remote_id)
    except BridgeError as e:
        print(f"dmbridge: {e.message}", file=sys.stderr)
        return 1
    db = create_database(settings.database_url, db_args={}, log=logging.getLogger("dmbridge.db"))
    try:
        await start_database(db, settings.database_url)
    except StartupError as e:
        print(f"dmbridge: {e}", file=sys.stderr)
        return 1
    homeserver = Homeserver(settings.homeserver_url, settings.as_token)
    try:
        stores = Stores.over(db)
        found = await find(stores, subject)
        rooms = found.rooms()
        print(f"{subject}: {len(found.dms)} DM(s) in {len(rooms)} room(s)"
              + (f": {' '.join(rooms)}" if rooms else ""))
        if not yes and not _confirmed(f"Forget {subject}? The ghost leaves these rooms, the "
                                      "platform is told, and what the bridge kept is deleted."
                                      " [y/N] "):
            print("nothing was changed")
            return 1
        # m.direct is read, changed and written back: in turn with the workers' own updates.
        direct_locks = GhostLocks(db, holders=1)

        async def leave(ghost_id: UserID, room_id: RoomID) -> None:
            await homeserver.leave_and_forget(ghost_id, room_id)
            async with direct_locks.hold(ghost_id):
                await homeserver.remove_from_m_direct(ghost_id, room_id)

        done = await forget(stores, subject, leave, reset=homeserver.reset_profile)
    except BridgeError as e:
        print(f"dmbridge: {e.message}", file=sys.stderr)
        return 1
    finally:
        await homeserver.close()
        await db.stop()
    print(f"the platform is told: {done.notices} dm.forgotten notice(s) queued")
    print(f"the ghost left {len(done.left)} room(s)"
          + (f": {' '.join(done.left)}" if done.left else ""))
    print("deleted rows: " + ", ".join(f"{kind} {n}" for kind, n in done.counts.items()))
    for room_id, error in done.failed.items():
        print(f"dmbridge: the ghost could not leave {room_id}: {error}; its DM is kept (ended):"
              " run the command again", file=sys.stderr)
    if done.profile_error is not None:
        print(f"dmbridge: the ghost's name and avatar could not be reset: {done.profile_error};"
              " run the command again", file=sys.stderr)
    return 1 if done.failed or done.profile_error else 0


def _confirmed(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False
