"""Whether the process holding a DM creation claim is alive, on both database backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from mautrix.types import UserID
from mautrix.util.async_db import Database

from dmbridge.db import now_ms, upgrade_table
from dmbridge.db.dm import ABANDONED, CREATING, DMRecord
from dmbridge.instances import Instances


def _claim(instance: str | None, age_s: float = 0) -> DMRecord:
    return DMRecord(
        ghost_id=UserID("@dm_sms_1:localhost"), user_id=UserID("@alice:localhost"),
        network="sms", remote_id="1", room_id=None, state=CREATING, claim="c",
        updated_at=now_ms() - int(age_s * 1000), user_membership=None, ghost_membership=None,
        others_joined=0, ghost_displayname=None, reason=None, user_displayname=None,
        instance=instance,
    )


async def _gone(checker: Instances, record: DMRecord) -> bool:
    """PostgreSQL lists a closed connection for a moment longer: ask for a while."""
    deadline = time.monotonic() + 10
    while await checker.creator_alive(record):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@asynccontextmanager
async def _two_processes(db_url: str) -> AsyncIterator[tuple[Database, Instances, Instances]]:
    """Two bridge processes' presences on one database: one holds a claim, one checks it."""
    db = Database.create(db_url, upgrade_table=upgrade_table)
    await db.start()
    holder, checker = Instances(db, db_url, 30), Instances(db, db_url, 30)
    await holder.start()
    await checker.start()
    try:
        yield db, holder, checker
    finally:
        await holder.stop()
        await checker.stop()
        await db.stop()


async def test_a_claim_is_alive_while_its_process_is_and_dead_once_it_stops(db_url: str
                                                                            ) -> None:
    async with _two_processes(db_url) as (_, holder, checker):
        record = _claim(holder.id)
        assert await checker.creator_alive(record)
        # The checker's own claims are leftovers: it holds the pair's lock when it asks.
        assert not await checker.creator_alive(_claim(checker.id))
        assert not await checker.creator_alive(_claim(ABANDONED))
        assert not await checker.creator_alive(_claim("ffffffffffffffff"))  # never seen
        assert not await checker.creator_alive(_claim(holder.id, age_s=31))  # too old
        assert await checker.creator_alive(_claim(None))  # older versions: only time tells
        assert not await checker.creator_alive(_claim(None, age_s=31))
        await holder.stop()
        assert await _gone(checker, record)


async def test_a_lost_presence_connection_comes_back_before_the_next_claim(db_url: str
                                                                           ) -> None:
    """PostgreSQL restarted or dropped the connection: the process would look dead to the
    others while it creates rooms, unless it reconnects before it claims a pair."""
    if db_url.startswith("sqlite"):
        pytest.skip("a file lock cannot be lost while its process lives")
    async with _two_processes(db_url) as (db, holder, checker):
        record = _claim(holder.id)
        assert holder._presence is not None
        await db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE application_name = $1", "dmbridge/" + holder.id)
        assert await _gone(checker, record)
        await holder.ensure_present()
        assert await checker.creator_alive(record)


async def test_start_up_sweeps_the_presence_files_of_killed_processes(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'dmbridge.db'}"
    db = Database.create(db_url, upgrade_table=upgrade_table)
    await db.start()
    live = Instances(db, db_url, 30)
    await live.start()
    folder = tmp_path / "dmbridge.db.instances"
    (folder / "0123456789abcdef").touch()  # a SIGKILLed process's lock file, no lock held
    fresh = Instances(db, db_url, 30)
    try:
        await fresh.start()
        assert sorted(p.name for p in folder.iterdir()) == sorted([live.id, fresh.id])
    finally:
        await fresh.stop()
        await live.stop()
        await db.stop()
