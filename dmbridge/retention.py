"""Data lifecycle: old rows are deleted in the background, in small batches, on both databases.

What is kept, and for how long, is ``retention.*`` in the config (README: "Retention and
forgetting"). Each kind is deleted oldest first, at most ``batch`` rows per statement with a
short pause between statements, so that a large backlog never holds SQLite's single connection
(or a PostgreSQL table lock) for long. On PostgreSQL, workers sharing the database take turns:
a round is skipped while another worker holds the retention advisory lock, which a round always
releases (ending its connection if it cannot).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
from mautrix.util.async_db import Connection, Database, Scheme

from .config import RetentionSettings
from .db import now_ms

log = logging.getLogger("dmbridge.retention")

DAY_MS = 86400 * 1000
# Kept a fixed time, not configurable: what they protect needs no longer.
PROCESSED_EVENT_TTL_MS = 7 * DAY_MS  # homeserver transactions are resent for minutes, not days
DELIVERED_TTL_MS = 7 * DAY_MS  # delivered items dedupe replays of recent events only
# A notice about an undelivered message dedupes replays of its event (as processed events do);
# one about a dead letter is kept while the dead letter is, and while it is queued again, to
# be corrected if the retry delivers it (or not told twice if it fails again).
UNDELIVERED_NOTICE_TTL_MS = 7 * DAY_MS
FIRST_ROUND_S = 60.0
INTERVAL_S = 3600.0
BATCH = 1000
PAUSE_S = 0.05
UNLOCK_S = 5.0  # a lock release not answered by then ends the session instead
# Any 64-bit key the bridge's workers agree on ("dmbridge" in ASCII).
LOCK_KEY = 0x646D627269646765

# One kind of row: its table, its key columns, and which rows of it are old (the cutoff is $1;
# each condition is served by an index on the time column, see migration v06).
_KINDS: dict[str, tuple[str, str, str]] = {
    "sent_messages": ("sent_message", "network, remote_id, message_id", "created_at < $1"),
    "matrix_messages": ("matrix_message", "event_id", "created_at < $1"),
    "history": ("dm_history", "id", "at < $1"),
    # A ghost's current avatar stays: each message the platform sends may name it again.
    "media": ("media", "content_uri",
              "created_at < $1 AND NOT EXISTS"
              " (SELECT 1 FROM ghost WHERE ghost.avatar_url = media.content_uri)"),
    "dead_letters": ("outbox", "id", "state = 'dead' AND finished_at < $1"),
    "delivered": ("outbox", "id", "state = 'delivered' AND finished_at < $1"),
    "processed_events": ("processed_event", "event_id", "received_at < $1"),
    "undelivered_notices": ("undelivered_notice", "event_id",
                            "updated_at < $1 AND shown = told AND NOT EXISTS (SELECT 1 FROM"
                            " outbox WHERE outbox.idempotency_key = undelivered_notice.event_id"
                            " AND outbox.state IN ('dead', 'pending'))"),
}
KINDS = tuple(_KINDS)


@dataclass(frozen=True)
class Limits:
    """Milliseconds each kind is kept (None: forever)."""

    ages: dict[str, int | None]

    @classmethod
    def of(cls, settings: RetentionSettings) -> Limits:
        def days(value: float) -> int | None:
            return int(value * DAY_MS) if value > 0 else None

        maps = days(settings.message_maps)
        return cls({
            "sent_messages": maps,
            "matrix_messages": maps,
            "history": days(settings.history),
            "media": days(settings.media),
            "dead_letters": days(settings.dead_letters),
            "delivered": DELIVERED_TTL_MS,
            "processed_events": PROCESSED_EVENT_TTL_MS,
            "undelivered_notices": UNDELIVERED_NOTICE_TTL_MS,
        })


Run = Callable[[str, int, int], Awaitable[int]]


class Retention:
    """Prunes what is older than its limit: once shortly after start, then every interval."""

    def __init__(self, db: Database, settings: RetentionSettings, *, batch: int = BATCH,
                 pause: float = PAUSE_S) -> None:
        self.db = db
        self.limits = Limits.of(settings)
        self.batch = batch
        self.pause = pause
        self.statements: dict[str, int] = {}  # DELETE statements run per kind, for tests
        self._task: asyncio.Task[None] | None = None

    def start(self, first: float = FIRST_ROUND_S, every: float = INTERVAL_S) -> None:
        self._task = asyncio.create_task(self._loop(first, every))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self, first: float, every: float) -> None:
        await asyncio.sleep(first)
        while True:
            try:
                await self.prune()
            except Exception:
                log.exception("pruning old rows failed; trying again in %d s", every)
            await asyncio.sleep(every)

    async def prune(self, now: int | None = None) -> dict[str, int] | None:
        """One round over every kind: rows deleted per kind, or None if another worker is
        pruning. Logs one line."""
        now = now_ms() if now is None else now
        if self.db.scheme not in (Scheme.POSTGRES, Scheme.COCKROACH):
            # SQLite: one connection for everything; each batch takes it only briefly.
            return self._logged(await self._round(self._on_db, now))
        conn: Connection
        async with self.db.acquire() as conn:
            try:
                locked = await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY)
            except BaseException:
                # The server may have taken the lock and the answer been lost (cancelled, or a
                # timeout): only ending the session is sure to let it go.
                _end_session(conn)
                raise
            if not locked:
                log.info("pruning skipped: another worker is pruning")
                return None
            try:
                async def on_conn(kind: str, cutoff: int, limit: int) -> int:
                    return await _delete(conn, kind, cutoff, limit)
                return self._logged(await self._round(on_conn, now))
            finally:
                await _unlock(conn)

    async def _on_db(self, kind: str, cutoff: int, limit: int) -> int:
        return await _delete(self.db, kind, cutoff, limit)

    async def _round(self, run: Run, now: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        for kind, age in self.limits.ages.items():
            if age is None:
                continue
            total = 0
            while True:
                deleted = await run(kind, now - age, self.batch)
                self.statements[kind] = self.statements.get(kind, 0) + 1
                total += deleted
                if deleted < self.batch:
                    break
                await asyncio.sleep(self.pause)  # let the hot path have the database
            counts[kind] = total
        return counts

    @staticmethod
    def _logged(counts: dict[str, int]) -> dict[str, int]:
        log.info("pruned old rows: %s",
                 ", ".join(f"{kind} {n}" for kind, n in counts.items()) or "nothing is pruned")
        return counts


async def _unlock(conn: Connection) -> None:
    """Release the round's session lock, or end the session if that fails or is not answered
    within ``UNLOCK_S`` (ending it releases the lock): pooled connections go back to the pool as
    they are, locks included. Runs while a stopped round unwinds, so it never waits on a
    database that has stopped answering, and never replaces the round's cancellation by an
    error of its own."""
    try:
        await asyncio.wait_for(conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY), UNLOCK_S)
    except Exception as e:  # no answer in time, or unusable after a cancelled statement
        log.warning("releasing the pruning lock failed (%s); ending the database session "
                    "instead, which releases it", type(e).__name__)
        _end_session(conn)
    except BaseException:  # cancelled while releasing
        _end_session(conn)
        raise


def _end_session(conn: Connection) -> None:
    """Close the connection at once; the server ends its session, and the session's locks."""
    cast(asyncpg.Connection, conn.wrapped).terminate()


def oldest(kind: str) -> str:
    """The query for up to $2 keys of ``kind``'s rows older than $1."""
    table, columns, old = _KINDS[kind]
    return f"SELECT {columns} FROM {table} WHERE {old} LIMIT $2"


async def _delete(conn: Connection | Database, kind: str, cutoff: int, limit: int) -> int:
    table, columns, _ = _KINDS[kind]
    key = f"({columns})" if "," in columns else columns
    rows: list[Any] = await conn.fetch(
        f"DELETE FROM {table} WHERE {key} IN ({oldest(kind)}) RETURNING 1", cutoff, limit)
    return len(rows)
