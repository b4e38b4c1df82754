"""The m.direct lock across workers on PostgreSQL: a holder waits a bounded time for another
worker's turn, and holders waiting on other workers leave pooled connections for sends."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from mautrix.types import UserID
from mautrix.util.async_db import Database

from dmbridge.db import create_database, start_database
from dmbridge.ghostlock import M_DIRECT_LOCK_SPACE, GhostLockBusy, GhostLocks, shared_holders
from tests.support.postgres import PostgresCluster

POOL_MAX = 4
# A bound on the test itself: without the fix it would wait for ever.
GIVE_UP_S = 30


@pytest.fixture
async def pg_url(pg_cluster: PostgresCluster) -> str:
    return pg_cluster.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = create_database(pg_url, db_args={"min_size": 1, "max_size": POOL_MAX},
                               log=logging.getLogger("dmbridge.db.test"))
    await start_database(database, pg_url)
    try:
        yield database
    finally:
        await database.stop()


async def other_worker_holds(pg_url: str, ghosts: list[UserID]) -> asyncpg.Connection:
    conn = await asyncpg.connect(pg_url)
    for ghost_id in ghosts:
        await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", M_DIRECT_LOCK_SPACE,
                           ghost_id)
    return conn


async def test_a_holder_gives_up_when_another_worker_keeps_the_ghost(
    db: Database, pg_url: str,
) -> None:
    ghost = UserID("@telegram_1:hs.test")
    other = await other_worker_holds(pg_url, [ghost])
    locks = GhostLocks(db, holders=shared_holders(POOL_MAX), wait_ms=100)
    try:
        async def take() -> None:
            async with locks.hold(ghost):
                pass

        with pytest.raises(GhostLockBusy):
            await asyncio.wait_for(take(), GIVE_UP_S)
    finally:
        await other.close()
    async with locks.hold(ghost):  # free again: taken at once, and the pool is whole
        assert await db.fetchval("SELECT 1") == 1


async def test_holders_waiting_on_other_workers_leave_connections_for_sends(
    db: Database, pg_url: str,
) -> None:
    ghosts = [UserID(f"@telegram_{i}:hs.test") for i in range(POOL_MAX)]
    other = await other_worker_holds(pg_url, ghosts)
    locks = GhostLocks(db, holders=shared_holders(POOL_MAX), wait_ms=GIVE_UP_S * 2000)

    async def take(ghost_id: UserID) -> None:
        async with locks.hold(ghost_id):
            pass

    waiting = [asyncio.create_task(take(g)) for g in ghosts]
    try:
        # A send's statement still gets a connection while every ghost is held elsewhere.
        assert await asyncio.wait_for(db.fetchval("SELECT 1"), GIVE_UP_S) == 1
        assert not any(task.done() for task in waiting)
    finally:
        await other.close()  # the other worker ends: its locks go
        results = await asyncio.gather(*waiting, return_exceptions=True)
    assert results == [None] * POOL_MAX
