"""Notices owed to Matrix users about their messages that did not reach the platform."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection, Database

FAILED, DELIVERED = "failed", "delivered"

# Why a message did not reach the platform.
DEAD_LETTER = "dead_letter"  # the platform never accepted it (see the outbox)
NOT_A_DM = "not_a_dm"  # someone else joined the room: it is no longer a DM
ELSEWHERE = "elsewhere"  # the DM with the contact is another room now

_COLUMNS = ("event_id, room_id, ghost_id, reason, told, shown, notice_event_id, attempts,"
            " created_at")


# What changed is due now, or once the lease held on it by an attempt under way runs out.
_DUE = ("due_at=CASE WHEN lease_until IS NOT NULL AND lease_until > $1 THEN lease_until"
        " ELSE $1 END")


@dataclass(frozen=True)
class UndeliveredNotice:
    event_id: str
    """The Matrix user's event that did not reach the platform."""
    room_id: str
    ghost_id: str
    reason: str
    told: str
    """What the room should say about it: FAILED, or DELIVERED after a retry got through."""
    shown: str | None
    """What the room says now (None: nothing yet)."""
    notice_event_id: str | None
    attempts: int
    created_at: int


def _notice(row: Any) -> UndeliveredNotice:
    return UndeliveredNotice(**{k: row[k] for k in UndeliveredNotice.__dataclass_fields__})


class UndeliveredStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    async def add(conn: Connection, event_id: str, room_id: str, ghost_id: str, reason: str,
                  now: int) -> bool:
        """Owe the user a notice about ``event_id``; False if one is owed (or told) already."""
        got = await conn.fetchval(
            "INSERT INTO undelivered_notice (event_id, room_id, ghost_id, reason, told,"
            " created_at, updated_at, due_at) VALUES ($1, $2, $3, $4, 'failed', $5, $5, $5)"
            " ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            event_id, room_id, ghost_id, reason, now,
        )
        return got is not None

    @staticmethod
    async def add_for_room(conn: Connection, event_id: str, room_id: str, ghost_id: str,
                           reason: str, since: int, now: int) -> bool:
        """Owe the user a notice about ``event_id``, unless the room was told ``reason`` for
        another message since ``since``: what holds for the whole room is said there once."""
        got = await conn.fetchval(
            "INSERT INTO undelivered_notice (event_id, room_id, ghost_id, reason, told,"
            " created_at, updated_at, due_at) SELECT $1, $2, $3, $4, 'failed', $5, $5, $5"
            " WHERE NOT EXISTS (SELECT 1 FROM undelivered_notice WHERE room_id=$2"
            " AND reason=$4 AND created_at >= $6)"
            " ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            event_id, room_id, ghost_id, reason, now, since,
        )
        return got is not None

    async def add_now(self, event_id: str, room_id: str, ghost_id: str, reason: str,
                      now: int) -> bool:
        conn: Connection
        async with self.db.acquire() as conn:
            return await self.add(conn, event_id, room_id, ghost_id, reason, now)

    @staticmethod
    async def delivered(conn: Connection, event_ids: list[str], now: int) -> int:
        """These events reached the platform after all: the room should say so."""
        if not event_ids:
            return 0
        marks = ", ".join(f"${i}" for i in range(2, len(event_ids) + 2))
        rows = await conn.fetch(
            f"UPDATE undelivered_notice SET told='delivered', updated_at=$1, attempts=0, {_DUE}"
            f" WHERE told='failed' AND event_id IN ({marks}) RETURNING event_id",
            now, *event_ids,
        )
        return len(rows)

    @staticmethod
    async def delivered_items(conn: Connection, network: str, ids: list[int], now: int) -> int:
        """The outbox items ``ids`` of ``network`` were acknowledged: their events reached
        the platform after all."""
        if not ids:
            return 0
        marks = ", ".join(f"${i}" for i in range(3, len(ids) + 3))
        rows = await conn.fetch(
            f"UPDATE undelivered_notice SET told='delivered', updated_at=$1, attempts=0, {_DUE}"
            " WHERE told='failed' AND event_id IN (SELECT idempotency_key"
            f" FROM outbox WHERE network=$2 AND state='delivered' AND id IN ({marks}))"
            " RETURNING event_id",
            now, network, *ids,
        )
        return len(rows)

    async def due(self, now: int, limit: int) -> list[UndeliveredNotice]:
        """Notices whose room does not say what it should yet, and that nobody is sending."""
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM undelivered_notice WHERE due_at <= $1"
            " ORDER BY due_at LIMIT $2",
            now, limit,
        )
        return [_notice(r) for r in rows]

    async def lease(self, notice: UndeliveredNotice, now: int, until: int) -> bool:
        """Hold the notice for one attempt (counted now); False if another worker holds it or
        it changed meanwhile."""
        got = await self.db.fetchval(
            "UPDATE undelivered_notice SET lease_until=$4, due_at=$4, attempts=attempts+1"
            " WHERE event_id=$1 AND told=$2 AND (shown IS NULL OR shown <> told)"
            " AND (lease_until IS NULL OR lease_until < $3) RETURNING event_id",
            notice.event_id, notice.told, now, until,
        )
        return got is not None

    async def shown(self, notice: UndeliveredNotice, notice_event_id: str | None, now: int
                    ) -> None:
        """The room says what ``notice.told`` said when it was leased (or the bridge gave up
        making it say so). If ``told`` changed meanwhile, the next round shows that."""
        await self.db.execute(
            "UPDATE undelivered_notice SET shown=$2, updated_at=$3, attempts=0,"
            " lease_until=NULL, notice_event_id=COALESCE($4, notice_event_id),"
            " due_at=CASE WHEN told=$2 THEN NULL ELSE CAST($3 AS BIGINT) END"
            " WHERE event_id=$1",
            notice.event_id, notice.told, now, notice_event_id,
        )

    async def later(self, notice: UndeliveredNotice, at: int) -> None:
        """Try again at ``at``."""
        await self.db.execute(
            "UPDATE undelivered_notice SET lease_until=$2, due_at=$2 WHERE event_id=$1",
            notice.event_id, at,
        )

    async def get(self, event_id: str) -> UndeliveredNotice | None:
        row = await self.db.fetchrow(
            f"SELECT {_COLUMNS} FROM undelivered_notice WHERE event_id=$1", event_id)
        return _notice(row) if row else None
