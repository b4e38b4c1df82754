"""An outbox leased before leases had holders: its rows go out once those leases run out."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from mautrix.util.async_db import Database, UpgradeTable

from dmbridge.db import Stores, create_database, start_database
from dmbridge.db.upgrade import upgrade_table

LOG = logging.getLogger("dmbridge.db")
USER = "@alice:example.org"
LANE = ("sms", "+15550000001", USER)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dmbridge.db'}"
    return str(request.getfixturevalue("pg_cluster").create_database(
        f"t_{uuid.uuid4().hex[:12]}"))


async def test_rows_leased_without_a_holder_go_out_once_their_leases_ran_out(url: str) -> None:
    before = UpgradeTable(database_name="dmbridge")
    before.upgrades = upgrade_table.upgrades[:9]  # the schema before lease holders
    old = Database.create(url, upgrade_table=before, log=LOG)
    await old.start()
    try:
        for n, lease_until in ((1, 10_000), (2, None)):
            await old.execute(
                "INSERT INTO outbox (network, remote_id, user_id, type, idempotency_key,"
                " payload, state, attempts, next_attempt_at, lease_until, created_at,"
                " queued_at) VALUES ($1, $2, $3, 'message', $4, '{}', 'pending', $5, 1000, $6,"
                " 1000, 1000)", *LANE, f"k{n}", 1 if lease_until else 0, lease_until)
    finally:
        await old.stop()
    db = create_database(url, db_args={}, log=LOG)
    await start_database(db, url)
    try:
        stores = Stores.over(db)
        head, second = [int(r["id"]) for r in await db.fetch("SELECT id FROM outbox ORDER BY id")]
        # Its lease holds: nobody takes it, nor the item behind it.
        assert await stores.outbox.due_heads(["sms"], 5000, 10) == []
        assert not await stores.outbox.lease(head, 5000, 60_000, "early")
        assert await stores.outbox.lease_next(LANE, 0, 5000, 60_000, "early", 16) == []
        assert await stores.outbox.delivered_all([(head, "early")], 5000) == set()
        # Once it ran out, it is leased again, with a holder, and goes out in order.
        assert [i.id for i in await stores.outbox.due_heads(["sms"], 10_001, 10)] == [head]
        assert await stores.outbox.lease(head, 10_001, 60_000, "late")
        assert await stores.outbox.delivered_all([(head, "late")], 11_000) == {head}
        [after] = await stores.outbox.lease_next(LANE, head, 11_000, 60_000, "late", 16)
        assert after.id == second and after.lease_token == "late"
    finally:
        await db.stop()
