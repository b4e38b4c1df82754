"""One holder at a time per ghost, across every worker on the database.

A ghost's ``m.direct`` is read, merged and written back; two writers at once would each write
what they read, and one's room would vanish from the ghost's list. In one process a per-ghost
asyncio lock is enough (SQLite has one worker). Workers sharing a PostgreSQL database also take
a transaction-scoped advisory lock keyed on the ghost: PostgreSQL releases it when the
transaction ends, whether it commits, rolls back, or its connection dies with its worker. The
holder's own statements run on that connection (mautrix hands a task the connection it holds),
so holders never wait for a second pooled connection while keeping one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mautrix.types import UserID
from mautrix.util.async_db import Connection, Database, Scheme

from .locks import KeyedLocks

# The first half of the two-part advisory key, naming what is locked; the second half is the
# ghost's hash. Two-part keys never meet the one-part key of :mod:`dmbridge.retention`.
M_DIRECT_LOCK_SPACE = 0x6D646972  # "mdir" in ASCII


class GhostLocks:
    """``async with locks.hold(ghost_id):`` one holder per ghost, in this process and beyond."""

    def __init__(self, db: Database, space: int = M_DIRECT_LOCK_SPACE) -> None:
        self.db = db
        self.space = space
        self._local: KeyedLocks[UserID] = KeyedLocks()
        self._shared = db.scheme in (Scheme.POSTGRES, Scheme.COCKROACH)

    @asynccontextmanager
    async def hold(self, ghost_id: UserID) -> AsyncIterator[None]:
        # The local lock first: waiters in this process queue here, not on pool connections.
        async with self._local.hold(ghost_id):
            if not self._shared:
                yield
                return
            conn: Connection
            async with self.db.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                                   self.space, ghost_id)
                yield
