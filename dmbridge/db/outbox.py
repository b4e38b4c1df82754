"""What the bridge owes platforms, kept until delivered (or declared dead)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection, Database

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"

_COLUMNS = (
    "id, network, remote_id, user_id, type, idempotency_key, payload, state, attempts,"
    " next_attempt_at, last_error, created_at, queued_at, finished_at"
)


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

    def event(self) -> dict[str, Any]:
        """What the platform receives: the stored payload with its position in the outbox."""
        return {"id": self.id, **json.loads(self.payload)}


def _item(row: Any) -> OutboxItem:
    return OutboxItem(**{k: row[k] for k in OutboxItem.__dataclass_fields__})


def _in(values: list[str], first: int) -> str:
    return ", ".join(f"${i}" for i in range(first, first + len(values)))


class OutboxStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    async def add(
        conn: Connection, *, network: str, remote_id: str, user_id: str, type: str,
        key: str, payload: dict[str, Any], now: int,
    ) -> int | None:
        """Queue an item; None if one with this idempotency key was already queued."""
        value = await conn.fetchval(
            "INSERT INTO outbox (network, remote_id, user_id, type, idempotency_key, payload,"
            " state, next_attempt_at, created_at, queued_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7, $7)"
            " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
            network, remote_id, user_id, type, key, json.dumps(payload, ensure_ascii=False), now,
        )
        return int(value) if value is not None else None

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

    async def lease(self, item_id: int, now: int, until: int) -> bool:
        """Hold the item for one delivery attempt, counted now: a crash mid-way still counts."""
        got = await self.db.fetchval(
            "UPDATE outbox SET lease_until=$3, attempts=attempts+1 WHERE id=$1 AND state='pending'"
            " AND (lease_until IS NULL OR lease_until < $2) RETURNING id",
            item_id, now, until,
        )
        return got is not None

    async def release(self, ids: list[int]) -> None:
        """Give up leases (on shutdown), so the items go out at once after a restart."""
        if ids:
            await self.db.execute(
                f"UPDATE outbox SET lease_until=NULL WHERE id IN ({_in([str(i) for i in ids], 1)})",
                *ids,
            )

    async def delivered(self, item_id: int, attempts: int, now: int,
                        conn: Connection | None = None) -> None:
        await (conn or self.db).execute(
            "UPDATE outbox SET state='delivered', attempts=$2, finished_at=$3, lease_until=NULL,"
            " last_error=NULL WHERE id=$1 AND state='pending'",
            item_id, attempts, now,
        )

    async def retry_later(self, item_id: int, attempts: int, next_at: int, error: str) -> None:
        await self.db.execute(
            "UPDATE outbox SET attempts=$2, next_attempt_at=$3, last_error=$4, lease_until=NULL"
            " WHERE id=$1 AND state='pending'",
            item_id, attempts, next_at, error[:1000],
        )

    async def kill(self, item_id: int, attempts: int, error: str, now: int,
                   conn: Connection | None = None) -> bool:
        """Make the item a dead letter; False if it was no longer pending."""
        got = await (conn or self.db).fetchval(
            "UPDATE outbox SET state='dead', attempts=$2, last_error=$3, finished_at=$4,"
            " lease_until=NULL WHERE id=$1 AND state='pending' RETURNING id",
            item_id, attempts, error[:1000], now,
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
            " pulled_at=NULL, lease_until=NULL, finished_at=NULL"
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
