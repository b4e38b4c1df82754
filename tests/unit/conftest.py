"""Fixtures for the unit tests: the bridge's tables on both database backends, a fake homeserver."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dmbridge.db import Stores, create_database
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.postgres import PostgresCluster
from tests.support.settings import AS_TOKEN

POOL_CLOSE_S = 30.0


@pytest.fixture(scope="module")
def module_pg_url(request: pytest.FixtureRequest) -> str:
    """One PostgreSQL database per module: createdb costs ~0.3 s, emptying it ~0.02 s."""
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    return cluster.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "postgres"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    """Empty, migrated tables on each backend (like conftest's ``db_url``, but faster)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'dmbridge.db'}"
    else:
        url = request.getfixturevalue("module_pg_url")
    db = create_database(url, db_args={}, log=logging.getLogger("dmbridge.db"))  # the bridge's
    await db.start()
    if request.param == "postgres":
        tables = [r["tablename"] for r in await db.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname='public' AND tablename<>'version'")]
        await db.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
    yield Stores.over(db)
    # Bounded: closing the pool waits for every connection to come back, so a test that left
    # one out fails here (the pool is then terminated) instead of hanging the run.
    await asyncio.wait_for(db.stop(), POOL_CLOSE_S)


@pytest.fixture
async def hs() -> AsyncIterator[FakeHomeserver]:
    """A fake homeserver on 127.0.0.1 that records what the bridge asks of it."""
    server = FakeHomeserver(AS_TOKEN)
    await server.start()
    yield server
    await server.stop()
