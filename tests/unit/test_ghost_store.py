"""A ghost's row is written once, whichever of several workers registers it first."""

from __future__ import annotations

import asyncio

from mautrix.types import UserID
from mautrix.util.async_db import Database

from dmbridge.db import Stores, upgrade_table


async def test_workers_registering_the_same_new_ghosts_at_once_all_succeed(
    module_pg_url: str,
) -> None:
    """Two workers' pools insert the same ghosts at the same moment: on PostgreSQL an insert
    that forgives only one unique key's conflict fails now and then on the other key."""
    pools = [Database.create(module_pg_url, upgrade_table=upgrade_table,
                             db_args={"min_size": 4, "max_size": 8}) for _ in range(2)]
    for db in pools:
        await db.start()
    try:
        workers = [Stores.over(db) for db in pools]
        ghosts = [(UserID(f"@dm_chat_race{i}:localhost"), f"race{i}") for i in range(600)]
        await asyncio.gather(*(
            stores.ghosts.mark_registered(user_id, "chat", remote_id)
            for user_id, remote_id in ghosts for stores in workers
        ))
        rows = await pools[0].fetch("SELECT user_id, registered FROM ghost"
                                    " WHERE remote_id LIKE 'race%'")
        assert sorted(r["user_id"] for r in rows) == sorted(u for u, _ in ghosts)
        assert all(r["registered"] for r in rows)
    finally:
        for db in pools:
            await db.stop()
