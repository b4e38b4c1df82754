"""What the bridge owes platforms, kept until delivered (or declared dead)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any, TypeVar

from mautrix.util.async_db import Connection, Database, Scheme

from .sqlite import SMALL_WRITE

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"

_COLUMNS = (
    "id, network, remote_id, user_id, type, idempotency_key, payload, state, attempts,"
    " next_attempt_at, last_error, created_at, queued_at, finished_at, lease_until, lease_token"
)
CHUNK = 100  # rows named in one statement, at most (SQLite allows 32766 parameters)
# Holds the lane of the row with id $1 for the rest of the transaction (PostgreSQL): every
# lease of a lane's items is taken under it, so two workers never lease parts of one lane
# (dmbridge_lease_lane takes the same lock).
_LOCK_LANE_OF = (
    "SELECT pg_advisory_xact_lock(hashtextextended(network || chr(9) || remote_id || chr(9)"
    " || user_id, 0)) FROM outbox WHERE id=$1"
)
# "Still pending", for a statement on rows found by id: as an expression, so that SQLite's
# planner (which has no statistics) looks the ids up rather than walk every pending item
# through an index on state.
_STILL_PENDING = "(state || '') = 'pending'"
# "Held under the token $n": a row leased by anyone is changed only by the holder of its
# lease; without a token (NULL), only a row nobody holds (a pulled item, say).
_HOLDER = "(lease_token=${n} OR (CAST(${n} AS TEXT) IS NULL AND lease_token IS NULL))"
T = TypeVar("T")


def chunks(values: Iterable[T], size: int = CHUNK) -> Iterator[list[T]]:
    it = iter(values)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


@dataclass(frozen=True)
class OutboxItem:
    id: int
    network: str
    remote_id: str
    user_id: str
    type: str
    idempotency_key: str
    payload: str
    state: str
    attempts: int
    next_attempt_at: int
    last_error: str | None
    created_at: int
    queued_at: int
    finished_at: int | None
    lease_until: int | None = None
    # The holder of the item's lease (new for every lease taken), if it is leased.
    lease_token: str | None = None

    def event(self) -> dict[str, Any]:
        """What the platform receives: the stored payload with its position in the outbox."""
        return {"id": self.id, **json.loads(self.payload)}


def _item(row: Any) -> OutboxItem:
    return OutboxItem(**{k: row[k] for k in OutboxItem.__dataclass_fields__})


def _locks_lanes(conn: Connection) -> bool:
    return conn.scheme in (Scheme.POSTGRES, Scheme.COCKROACH)


def _queued(row: Any, network: str, remote_id: str, user_id: str, type: str, key: str,
            payload: str, now: int, token: str) -> OutboxItem:
    """An item just queued, from its id, attempts and lease end as stored."""
    leased = row["lease_until"] is not None
    return OutboxItem(
        id=int(row["id"]), network=network, remote_id=remote_id, user_id=user_id, type=type,
        idempotency_key=key, payload=payload, state=PENDING, attempts=int(row["attempts"]),
        next_attempt_at=now, last_error=None, created_at=now, queued_at=now, finished_at=None,
        lease_until=int(row["lease_until"]) if leased else None,
        lease_token=token if leased else None,
    )


def _in(values: Sized, first: int) -> str:
    return ", ".join(f"${i}" for i in range(first, first + len(values)))


class OutboxStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.locks_lanes = db.scheme in (Scheme.POSTGRES, Scheme.COCKROACH)

    @staticmethod
    async def add(
        conn: Connection, *, network: str, remote_id: str, user_id: str, type: str,
        key: str, payload: dict[str, Any], now: int,
    ) -> int | None:
        """Queue an item; None if one with this idempotency key was already queued.

        On PostgreSQL the item's lane is locked first, until the transaction ends (see
        :meth:`add_leased`)."""
        if _locks_lanes(conn):
            value = await conn.fetchval(
                "SELECT id FROM dmbridge_queue($1, $2, $3, $4, $5, $6, $7, NULL, NULL)",
                network, remote_id, user_id, type, key,
                json.dumps(payload, ensure_ascii=False), now,
            )
            return int(value) if value is not None else None
        value = await conn.fetchval(
            SMALL_WRITE + "INSERT INTO outbox (network, remote_id, user_id, type,"
            " idempotency_key, payload, state, next_attempt_at, created_at, queued_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7, $7)"
            " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
            network, remote_id, user_id, type, key, json.dumps(payload, ensure_ascii=False), now,
        )
        return int(value) if value is not None else None

    @staticmethod
    async def add_leased(
        conn: Connection, *, network: str, remote_id: str, user_id: str, type: str,
        key: str, payload: dict[str, Any], now: int, lease_until: int, token: str,
    ) -> OutboxItem | None:
        """Queue an item, and lease it (its first attempt counted) if its lane has no other
        pending item, so that the caller may deliver it once the transaction commits; otherwise
        it waits its turn unleased. The item as stored (``lease_until`` says whether it was
        leased); None if one with this idempotency key was already queued.

        On PostgreSQL the item's lane is locked first, until the transaction ends, as every
        lease of its items is: ids within a lane are given in the order their transactions
        commit, and "no other pending item" counts those committed while it waited. (On SQLite
        writers take turns anyway.)"""
        text = json.dumps(payload, ensure_ascii=False)
        if _locks_lanes(conn):
            row = await conn.fetchrow(
                "SELECT id, attempts, lease_until FROM dmbridge_queue($1, $2, $3, $4, $5, $6,"
                " $7, $8, $9)",
                network, remote_id, user_id, type, key, text, now, lease_until, token,
            )
            return None if row is None else _queued(row, network, remote_id, user_id, type,
                                                    key, text, now, token)
        first = ("NOT EXISTS (SELECT 1 FROM outbox p WHERE p.state='pending' AND p.network=$1"
                 " AND p.remote_id=$2 AND p.user_id=$3)")
        row = await conn.fetchrow(
            SMALL_WRITE + "INSERT INTO outbox (network, remote_id, user_id, type,"
            " idempotency_key, payload, state, attempts, next_attempt_at, lease_until,"
            " lease_token, created_at, queued_at)"
            f" VALUES ($1, $2, $3, $4, $5, $6, 'pending', CASE WHEN {first} THEN 1 ELSE 0 END,"
            f" $7, CASE WHEN {first} THEN CAST($8 AS BIGINT) END,"
            f" CASE WHEN {first} THEN CAST($9 AS TEXT) END, $7, $7)"
            " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id, attempts, lease_until",
            network, remote_id, user_id, type, key, text, now, lease_until, token,
        )
        if row is None:
            return None
        return _queued(row, network, remote_id, user_id, type, key, text, now, token)

    async def add_now(self, **kwargs: Any) -> int | None:
        conn: Connection
        async with self.db.acquire() as conn:
            return await self.add(conn, **kwargs)

    async def due_heads(self, networks: list[str], now: int, limit: int) -> list[OutboxItem]:
        """The oldest pending item of each lane, if it is due and nobody holds it."""
        if not networks:
            return []
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM outbox o WHERE o.state = 'pending'"
            f" AND o.network IN ({_in(networks, 3)})"
            " AND o.next_attempt_at <= $1 AND (o.lease_until IS NULL OR o.lease_until < $1)"
            " AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.state = 'pending'"
            "   AND p.network = o.network AND p.remote_id = o.remote_id"
            "   AND p.user_id = o.user_id AND p.id < o.id)"
            " ORDER BY o.id LIMIT $2",
            now, limit, *networks,
        )
        return [_item(r) for r in rows]

    async def next_due_at(self, networks: list[str]) -> int | None:
        if not networks:
            return None
        # Lane heads only: an item queued behind another is not due until its head is done.
        value = await self.db.fetchval(
            "SELECT MIN(CASE WHEN o.lease_until IS NOT NULL AND o.lease_until > o.next_attempt_at"
            " THEN o.lease_until ELSE o.next_attempt_at END) FROM outbox o"
            f" WHERE o.state = 'pending' AND o.network IN ({_in(networks, 1)})"
            " AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.state = 'pending'"
            "   AND p.network = o.network AND p.remote_id = o.remote_id"
            "   AND p.user_id = o.user_id AND p.id < o.id)",
            *networks,
        )
        return int(value) if value is not None else None

    async def lease(self, item_id: int, now: int, until: int, token: str = "") -> bool:
        """Hold the item for one delivery attempt, counted now: a crash mid-way still counts.

        ``token`` names the holder (see :meth:`lease_next`). Only while the item is still
        its lane's oldest pending one, and no other item of its lane is held by anyone. On
        PostgreSQL the item's lane is locked first, as :meth:`lease_next` does.
        """
        statement = (
            "UPDATE outbox SET lease_until=$3, lease_token=$4, attempts=attempts+1"
            " WHERE id=$1 AND state='pending' AND (lease_until IS NULL OR lease_until < $2)"
            " AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.state='pending'"
            "   AND p.network=outbox.network AND p.remote_id=outbox.remote_id"
            "   AND p.user_id=outbox.user_id AND p.id <> outbox.id"
            "   AND (p.id < outbox.id OR p.lease_until >= $2))"
            " RETURNING id"
        )
        if not self.locks_lanes:
            return await self.db.fetchval(statement, item_id, now, until, token) is not None
        conn: Connection
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute(_LOCK_LANE_OF, item_id)
            return await conn.fetchval(statement, item_id, now, until, token) is not None

    async def lease_next(self, lane: tuple[str, str, str], after: int, now: int, until: int,
                         token: str, limit: int) -> list[OutboxItem]:
        """Lease a lane's next items for one delivery attempt each (counted now), in id order.

        ``lane`` is (network, remote_id, user_id); the caller delivered its items up to id
        ``after`` (whether or not their rows say so yet). Its first pending items after that,
        ``limit`` at most, are leased under ``token``, up to the first that cannot go now: one
        not due yet (a retry), or leased by anyone. On PostgreSQL the lane is locked first, so
        that no other worker leases a part of it meanwhile.
        """
        statement = (
            "UPDATE outbox SET lease_until=$6, lease_token=$7, attempts=attempts+1"
            f" WHERE {_STILL_PENDING} AND next_attempt_at <= $5"
            " AND (lease_until IS NULL OR lease_until < $5)"
            " AND id IN (SELECT c.id FROM (SELECT id FROM outbox"
            "   WHERE state='pending' AND network=$1 AND remote_id=$2 AND user_id=$3 AND id > $4"
            "   ORDER BY id LIMIT $8) AS c"
            " WHERE NOT EXISTS (SELECT 1 FROM outbox b WHERE b.state='pending' AND b.network=$1"
            "   AND b.remote_id=$2 AND b.user_id=$3 AND b.id > $4 AND b.id <= c.id"
            "   AND (b.next_attempt_at > $5 OR b.lease_until >= $5)))"
            f" RETURNING {_COLUMNS}"
        )
        if self.locks_lanes:  # the same, after the lane's lock, in one round trip
            statement = (f"SELECT {_COLUMNS} FROM dmbridge_lease_lane($1, $2, $3, $4, $5, $6,"
                         " $7, $8)")
        rows = await self.db.fetch(statement, *lane, after, now, until, token, limit)
        return sorted((_item(r) for r in rows), key=lambda item: item.id)

    async def renew(self, item_id: int, token: str, until: int) -> bool:
        """Extend a lease the caller still holds; False if it no longer does."""
        got = await self.db.fetchval(
            "UPDATE outbox SET lease_until=$3 WHERE id=$1 AND state='pending'"
            " AND lease_token=$2 RETURNING id",
            item_id, token, until,
        )
        return got is not None

    async def give_back(self, items: list[OutboxItem], *, uncount: bool = True) -> None:
        """Give up the leases of items, where they are still held under the tokens they were
        leased with: taken for attempts that never started (``uncount``: they do not count),
        or cut short by a stop (they count, yet the items go out at once after a restart)."""
        held = [item for item in items if item.lease_token is not None]
        for chunk in chunks(held):
            which = " OR ".join(f"(id=${2 * k + 1} AND lease_token=${2 * k + 2})"
                                for k in range(len(chunk)))
            await self.db.execute(
                "UPDATE outbox SET lease_until=NULL, lease_token=NULL,"
                f" attempts=attempts-{int(uncount)} WHERE state='pending' AND ({which})",
                *(value for item in chunk for value in (item.id, item.lease_token)),
            )

    async def delivered(self, item_id: int, attempts: int, now: int,
                        token: str | None = None, conn: Connection | None = None) -> None:
        """Mark the item delivered if it is held under ``token`` (without one: if nobody
        holds it)."""
        await (conn or self.db).execute(
            "UPDATE outbox SET state='delivered', attempts=$2, finished_at=$3, lease_until=NULL,"
            " lease_token=NULL, last_error=NULL WHERE id=$1 AND state='pending'"
            f" AND {_HOLDER.format(n=4)}",
            item_id, attempts, now, token,
        )

    async def delivered_all(self, held: list[tuple[int, str]], now: int,
                            conn: Connection | None = None) -> set[int]:
        """Mark delivered the items (id, lease token) whose attempts their leases counted, where
        they are still held under those tokens; the ids marked."""
        marked: set[int] = set()
        for chunk in chunks(held):
            ids, tokens = [i for i, _ in chunk], sorted({t for _, t in chunk})
            rows = await (conn or self.db).fetch(
                "UPDATE outbox SET state='delivered', finished_at=$1, lease_until=NULL,"
                f" lease_token=NULL, last_error=NULL WHERE {_STILL_PENDING}"
                f" AND id IN ({_in(ids, 2)}) AND lease_token IN ({_in(tokens, 2 + len(ids))})"
                " RETURNING id",
                now, *ids, *tokens,
            )
            marked.update(int(r["id"]) for r in rows)
        return marked

    async def retry_later(self, item_id: int, attempts: int, next_at: int, error: str,
                          token: str | None = None) -> bool:
        """Put the item off until ``next_at``; False if it is no longer pending, or not held
        under ``token`` (without one: held by anyone)."""
        got = await self.db.fetchval(
            "UPDATE outbox SET attempts=$2, next_attempt_at=$3, last_error=$4, lease_until=NULL,"
            " lease_token=NULL WHERE id=$1 AND state='pending'"
            f" AND {_HOLDER.format(n=5)} RETURNING id",
            item_id, attempts, next_at, error[:1000], token,
        )
        return got is not None

    async def kill(self, item_id: int, attempts: int, error: str, now: int,
                   token: str | None = None, conn: Connection | None = None) -> bool:
        """Make the item a dead letter; False if it was no longer pending, or not held under
        ``token`` (without one: held by anyone)."""
        got = await (conn or self.db).fetchval(
            "UPDATE outbox SET state='dead', attempts=$2, last_error=$3, finished_at=$4,"
            " lease_until=NULL, lease_token=NULL WHERE id=$1 AND state='pending'"
            f" AND {_HOLDER.format(n=5)} RETURNING id",
            item_id, attempts, error[:1000], now, token,
        )
        return got is not None

    async def pull(
        self, network: str, after: int, now: int, redeliver_before: int, limit: int
    ) -> list[OutboxItem]:
        """Pending items after the cursor, plus any never handed out or not acknowledged in time.

        Marks them handed out. Items come in id order, so each DM's order holds.
        """
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM outbox WHERE state='pending' AND network=$1"
            " AND (id > $2 OR pulled_at IS NULL OR pulled_at < $3) ORDER BY id LIMIT $4",
            network, after, redeliver_before, limit,
        )
        items = [_item(r) for r in rows]
        if items:
            ids = [i.id for i in items]
            await self.db.execute(
                f"UPDATE outbox SET pulled_at=$1, attempts=attempts+1"
                f" WHERE id IN ({_in([str(i) for i in ids], 2)})",
                now, *ids,
            )
        return items

    async def ack(self, network: str, ids: list[int], now: int,
                  conn: Connection | None = None) -> int:
        if not ids:
            return 0
        rows = await (conn or self.db).fetch(
            "UPDATE outbox SET state='delivered', finished_at=$2"
            f" WHERE network=$1 AND state='pending' AND id IN ({_in([str(i) for i in ids], 3)})"
            " RETURNING id",
            network, now, *ids,
        )
        return len(rows)

    async def expired(self, networks: list[str], queued_before: int, limit: int
                      ) -> list[OutboxItem]:
        """Pending items of these networks queued too long ago."""
        if not networks:
            return []
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM outbox WHERE state='pending' AND queued_at < $1"
            f" AND network IN ({_in(networks, 3)}) ORDER BY id LIMIT $2",
            queued_before, limit, *networks,
        )
        return [_item(r) for r in rows]

    async def dead_letters(self, network: str | None, limit: int) -> list[OutboxItem]:
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM outbox WHERE state='dead'"
            " AND (CAST($1 AS TEXT) IS NULL OR network=$1) ORDER BY id LIMIT $2",
            network, limit,
        )
        return [_item(r) for r in rows]

    async def requeue(self, network: str, ids: list[int] | None, now: int) -> list[int]:
        """Give dead letters a fresh start (all of the network's when ``ids`` is None)."""
        base = (
            "UPDATE outbox SET state='pending', attempts=0, next_attempt_at=$2, queued_at=$2,"
            " pulled_at=NULL, lease_until=NULL, lease_token=NULL, finished_at=NULL"
            " WHERE network=$1 AND state='dead'"
        )
        if ids is None:
            rows = await self.db.fetch(base + " RETURNING id", network, now)
        elif not ids:
            return []
        else:
            rows = await self.db.fetch(
                base + f" AND id IN ({_in([str(i) for i in ids], 3)}) RETURNING id",
                network, now, *ids,
            )
        return sorted(int(r["id"]) for r in rows)

    async def backlog(self) -> dict[str, tuple[int, int]]:
        """Per network: pending items and the oldest one's queued_at (ms)."""
        rows = await self.db.fetch(
            "SELECT network, COUNT(*) AS n, MIN(queued_at) AS oldest FROM outbox"
            " WHERE state='pending' GROUP BY network"
        )
        return {str(r["network"]): (int(r["n"]), int(r["oldest"])) for r in rows}

    async def dead_counts(self) -> dict[str, int]:
        """Per network: how many dead letters are kept."""
        rows = await self.db.fetch(
            "SELECT network, COUNT(*) AS n FROM outbox WHERE state='dead' GROUP BY network"
        )
        return {str(r["network"]): int(r["n"]) for r in rows}

    async def was_delivered_message(self, network: str, remote_id: str, user_id: str,
                                    event_id: str) -> bool:
        """Is ``event_id`` a Matrix message queued for this DM's platform (and not pruned)?"""
        value = await self.db.fetchval(
            "SELECT id FROM outbox WHERE idempotency_key=$1 AND type='message' AND network=$2"
            " AND remote_id=$3 AND user_id=$4",
            event_id, network, remote_id, user_id,
        )
        return value is not None

    async def get(self, item_id: int) -> OutboxItem | None:
        row = await self.db.fetchrow(f"SELECT {_COLUMNS} FROM outbox WHERE id=$1", item_id)
        return _item(row) if row else None
