"""One holder at a time per ghost, across every worker on the database.

A ghost's ``m.direct`` is read, merged and written back; two writers at once would each write
what they read, and one's room would vanish from the ghost's list. In one process a per-ghost
asyncio lock is enough (SQLite has one worker). Workers sharing a PostgreSQL database also take
a transaction-scoped advisory lock keyed on the ghost: PostgreSQL releases it when the
transaction ends, whether it commits, rolls back, or its connection dies with its worker. The
holder's own statements run on that connection (mautrix hands a task the connection it holds),
so holders never wait for a second pooled connection while keeping one.

A holder keeps its pooled connection for as long as the homeserver takes to answer the read and
the write (rate limits included), so only a few holders at a time take one (a quarter of the
pool), leaving the rest to sends; and a holder waits a bounded time for another worker's turn.
When the lock cannot be had, :data:`LOCK_FAILURES` says so and the caller leaves ``m.direct`` to
be repaired by the ghost's next DM (each update merges every room of the ghost).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from mautrix.types import UserID
from mautrix.util.async_db import Connection, Database, Scheme

from .locks import KeyedLocks

# The first half of the two-part advisory key, naming what is locked; the second half is the
# ghost's hash. Two-part keys never meet the one-part key of :mod:`dmbridge.retention`.
M_DIRECT_LOCK_SPACE = 0x6D646972  # "mdir" in ASCII
# How long a holder waits for another worker to finish with the same ghost.
LOCK_WAIT_MS = 10_000


class GhostLockBusy(Exception):
    """Another worker held the ghost's lock for longer than the wait."""


# What taking the lock may raise: the wait ran out, or the database could not be used.
LOCK_FAILURES: tuple[type[BaseException], ...] = (
    GhostLockBusy, asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
)


def shared_holders(pool_max_size: int) -> int:
    """Holders at a time in one process: a quarter of the pool, at least one."""
    return max(1, pool_max_size // 4)


class GhostLocks:
    """``async with locks.hold(ghost_id):`` one holder per ghost, in this process and beyond;
    at most ``holders`` of this process's holders keep a pooled connection at a time."""

    def __init__(self, db: Database, *, holders: int, space: int = M_DIRECT_LOCK_SPACE,
                 wait_ms: int = LOCK_WAIT_MS) -> None:
        self.db = db
        self.space = space
        self.wait_ms = wait_ms
        self._local: KeyedLocks[UserID] = KeyedLocks()
        self._turns = asyncio.Semaphore(holders)
        self._shared = db.scheme in (Scheme.POSTGRES, Scheme.COCKROACH)

    @asynccontextmanager
    async def hold(self, ghost_id: UserID) -> AsyncIterator[None]:
        # The local lock first: waiters in this process queue here, not on pool connections.
        async with self._local.hold(ghost_id):
            if not self._shared:
                yield
                return
            conn: Connection
            async with self._turns, self.db.acquire() as conn, conn.transaction():
                await conn.execute("SELECT set_config('lock_timeout', $1, true)",
                                   f"{self.wait_ms}ms")
                try:
                    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                                       self.space, ghost_id)
                except asyncpg.LockNotAvailableError as e:
                    raise GhostLockBusy(f"another worker held {ghost_id} for more than "
                                        f"{self.wait_ms / 1000:g} s") from e
                yield
