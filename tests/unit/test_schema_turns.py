"""Workers started together on a new PostgreSQL database: one creates the schema (dmbridge's
and mautrix's state store), the others wait for it, and all of them start."""

from __future__ import annotations

import asyncio
import logging
import uuid

from mautrix.util.async_db import Database

from dmbridge.db import create_database, start_database
from dmbridge.db.upgrade import upgrade_table
from dmbridge.statestore import BridgeStateStore
from tests.support.postgres import PostgresCluster


async def test_three_workers_starting_at_once_on_a_new_database_all_start(
    pg_cluster: PostgresCluster,
) -> None:
    url = pg_cluster.create_database(f"t_{uuid.uuid4().hex[:12]}")
    workers = [create_database(url, db_args={}, log=logging.getLogger(f"dmbridge.db.w{i}"))
               for i in range(3)]
    started: list[Database] = []
    try:
        stores = [BridgeStateStore(db) for db in workers]
        results = await asyncio.gather(
            *(start_database(db, url, extra=[store.upgrade_table])
              for db, store in zip(workers, stores, strict=True)),
            return_exceptions=True)
        started = [db for db, result in zip(workers, results, strict=True) if result is None]
        assert results == [None, None, None]
        versions = {await db.fetchval("SELECT version FROM version") for db in workers}
        assert versions == {len(upgrade_table.upgrades)}
        state_versions = {await db.fetchval("SELECT version FROM mx_version") for db in workers}
        assert state_versions == {len(stores[0].upgrade_table.upgrades)}
    finally:
        for db in started:
            await db.stop()
