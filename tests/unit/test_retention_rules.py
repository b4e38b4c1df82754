"""Retention: one prune round deletes what is older than its limit, keeps the rest, in batches."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from mautrix.types import ContentURI, EventID, RoomID, UserID
from mautrix.util.async_db import Connection, Scheme
from yarl import URL

from dmbridge.config import RetentionSettings
from dmbridge.db import Stores, create_database
from dmbridge.db.history import Transition
from dmbridge.db.media import Media
from dmbridge.db.message import MatrixMessage, SentMessage
from dmbridge.db.outbox import DEAD, DELIVERED, PENDING
from dmbridge.db.undelivered import DEAD_LETTER
from dmbridge.retention import DAY_MS, KINDS, LOCK_KEY, Retention, oldest
from tests.support.tcp_hold import AnswerHoldingProxy

NOW = 20_000 * DAY_MS
GHOST = UserID("@dm_sms_a:example.org")
USER = UserID("@alice:example.org")


# Bound on stopping a round or closing a connection: a stop that never returns fails the test.
STOP_S = 30.0


def days_ago(days: float) -> int:
    return NOW - int(days * DAY_MS)


async def count(stores: Stores, table: str) -> int:
    return int(await stores.db.fetchval(f"SELECT COUNT(*) FROM {table}"))


async def sent(stores: Stores, message_id: str, at: int) -> None:
    await stores.messages.put("sms", "a", message_id, SentMessage(
        RoomID("!r:x"), EventID(f"$s-{message_id}")), at)


async def from_matrix(stores: Stores, event_id: str, at: int) -> None:
    conn: Connection
    async with stores.db.acquire() as conn:
        await stores.matrix_messages.add(conn, MatrixMessage(
            EventID(event_id), RoomID("!r:x"), "sms", "a", USER, "message"), at)


async def history(stores: Stores, at: int) -> None:
    conn: Connection
    async with stores.db.acquire() as conn:
        await stores.history.record(conn, Transition(
            GHOST, USER, "sms", "a", "!r:x", "active", "opened", None, at))


async def upload(stores: Stores, name: str, at: int) -> None:
    await stores.media.add(Media(ContentURI(f"mxc://x/{name}"), "sms", "image/png", 1), at)


async def queued(stores: Stores, key: str, state: str, finished: int) -> int:
    item = await stores.outbox.add_now(network="sms", remote_id="a", user_id=USER,
                                       type="message", key=key, payload={}, now=finished)
    assert item is not None
    if state == DELIVERED:
        await stores.outbox.delivered(item, 1, finished)
    elif state == DEAD:
        assert await stores.outbox.kill(item, 1, "gone", finished)
    return item


async def undelivered(stores: Stores, event_id: str, at: int, shown: bool = True) -> None:
    assert await stores.undelivered.add_now(event_id, "!r:x", GHOST, DEAD_LETTER, at)
    notice = await stores.undelivered.get(event_id)
    assert notice is not None
    if shown:
        await stores.undelivered.shown(notice, f"$notice-{event_id}", at)


async def test_a_round_prunes_each_kind_older_than_its_limit_and_keeps_the_rest(
        stores: Stores, caplog: pytest.LogCaptureFixture) -> None:
    for i, age in enumerate((91, 89)):
        await sent(stores, f"m{i}", days_ago(age))
        await from_matrix(stores, f"$m{i}", days_ago(age))
    for age in (366, 364):
        await history(stores, days_ago(age))
    await upload(stores, "old", days_ago(31))
    await upload(stores, "avatar", days_ago(400))
    await upload(stores, "new", days_ago(29))
    await stores.ghosts.mark_registered(GHOST, "sms", "a")
    await stores.ghosts.set_avatar(GHOST, "mxc://x/avatar")
    old_dead = await queued(stores, "d-old", DEAD, days_ago(31))
    new_dead = await queued(stores, "d-new", DEAD, days_ago(29))
    old_done = await queued(stores, "done-old", DELIVERED, days_ago(8))
    new_done = await queued(stores, "done-new", DELIVERED, days_ago(6))
    old_pending = await queued(stores, "pending", PENDING, days_ago(1000))
    await undelivered(stores, "$told-old", days_ago(8))
    await undelivered(stores, "$told-new", days_ago(6))
    await undelivered(stores, "$untold-old", days_ago(100), shown=False)
    await undelivered(stores, "d-new", days_ago(100))  # its dead letter may be retried yet
    conn: Connection
    async with stores.db.acquire() as conn:
        assert await stores.events.claim(conn, EventID("$old"), days_ago(8))
        assert await stores.events.claim(conn, EventID("$new"), days_ago(6))

    caplog.set_level(logging.INFO, "dmbridge.retention")
    counts = await Retention(stores.db, RetentionSettings()).prune(NOW)

    assert counts == {"sent_messages": 1, "matrix_messages": 1, "history": 1, "media": 1,
                      "dead_letters": 1, "delivered": 1, "processed_events": 1,
                      "undelivered_notices": 1}
    assert await stores.messages.get("sms", "a", "m0") is None
    assert await stores.messages.get("sms", "a", "m1") is not None
    assert await stores.matrix_messages.get("$m0") is None
    assert await stores.matrix_messages.get("$m1") is not None
    assert [t.at for t in await stores.history.of_pair(GHOST, USER)] == [days_ago(364)]
    assert await stores.media.get("sms", "mxc://x/old") is None
    assert await stores.media.get("sms", "mxc://x/avatar") is not None  # the ghost's avatar
    assert await stores.media.get("sms", "mxc://x/new") is not None
    assert [await stores.outbox.get(i) is not None
            for i in (old_dead, new_dead, old_done, new_done, old_pending)] == [
        False, True, False, True, True]
    async with stores.db.acquire() as conn:
        assert await stores.events.claim(conn, EventID("$old"), NOW)  # forgotten: new again
        assert not await stores.events.claim(conn, EventID("$new"), NOW)
    assert [await stores.undelivered.get(e) is not None for e in (
        "$told-old", "$told-new", "$untold-old", "d-new")] == [False, True, True, True]
    [line] = [r.getMessage() for r in caplog.records if r.name == "dmbridge.retention"]
    assert line == ("pruned old rows: sent_messages 1, matrix_messages 1, history 1, media 1,"
                    " dead_letters 1, delivered 1, processed_events 1, undelivered_notices 1")


async def test_the_notice_of_a_dead_letter_queued_again_is_kept_until_it_settles(
        stores: Stores) -> None:
    """Told 10 days ago, the dead letter queued again: its notice is kept while the item is
    pending, so a delivery corrects it and another failure does not tell the user twice."""
    item = await queued(stores, "$retried", DEAD, days_ago(10))
    await undelivered(stores, "$retried", days_ago(10))
    assert await stores.outbox.requeue("sms", [item], days_ago(1)) == [item]
    counts = await Retention(stores.db, RetentionSettings()).prune(NOW)
    assert counts["undelivered_notices"] == 0
    assert await stores.undelivered.get("$retried") is not None


async def test_zero_keeps_a_kind_forever(stores: Stores) -> None:
    await sent(stores, "ancient", days_ago(10_000))
    await from_matrix(stores, "$ancient", days_ago(10_000))
    await history(stores, days_ago(10_000))
    await upload(stores, "ancient", days_ago(10_000))
    await queued(stores, "dead", DEAD, days_ago(10_000))
    forever = RetentionSettings(message_maps=0, history=0, media=0, dead_letters=0)
    counts = await Retention(stores.db, forever).prune(NOW)
    assert counts == {"delivered": 0, "processed_events": 0, "undelivered_notices": 0}
    for table in ("sent_message", "matrix_message", "dm_history", "media", "outbox"):
        assert await count(stores, table) == 1, table


async def test_more_rows_than_a_batch_are_all_pruned_in_several_statements(
        stores: Stores) -> None:
    for i in range(25):
        await sent(stores, f"old{i}", days_ago(100) + i)
    await sent(stores, "new", days_ago(1))
    retention = Retention(stores.db, RetentionSettings(), batch=10, pause=0)
    counts = await retention.prune(NOW)
    assert counts is not None and counts["sent_messages"] == 25
    assert retention.statements["sent_messages"] == 3  # 10, 10, then 5: the last one
    assert await count(stores, "sent_message") == 1


async def test_a_worker_skips_the_round_while_another_prunes(stores: Stores) -> None:
    if stores.db.scheme not in (Scheme.POSTGRES, Scheme.COCKROACH):
        pytest.skip("SQLite has one process: nothing to take turns with")
    await sent(stores, "old", days_ago(100))
    other = await asyncpg.connect(str(stores.db.url))  # another worker's session
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY)
        assert await Retention(stores.db, RetentionSettings()).prune(NOW) is None
    finally:
        await other.close()
    assert await count(stores, "sent_message") == 1
    assert (await Retention(stores.db, RetentionSettings()).prune(NOW) or {}).get(
        "sent_messages") == 1


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(1000):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never came: {what}")


@pytest.mark.parametrize("where", ["between statements", "in a statement"])
async def test_a_round_stopped_midway_leaves_the_lock_to_the_other_workers(
        stores: Stores, where: str) -> None:
    """Pooled connections are not reset on release: the round must release the lock itself."""
    if stores.db.scheme not in (Scheme.POSTGRES, Scheme.COCKROACH):
        pytest.skip("SQLite has one process: nothing to take turns with")
    for i in range(3):
        await sent(stores, f"old{i}", days_ago(100) + i)
    retention = Retention(stores.db, RetentionSettings(), batch=1, pause=3600)
    other = await asyncpg.connect(str(stores.db.url))  # another worker's session
    try:
        if where == "in a statement":  # the DELETE waits for this transaction's row locks
            txn = other.transaction()
            await txn.start()
            await other.execute("SELECT 1 FROM sent_message FOR UPDATE")
        retention.start(first=0)
        if where == "in a statement":
            # Asked on the pool, outside the other session's transaction: a transaction sees
            # pg_stat_activity as it was when it first looked, before the DELETE began.
            await _until(lambda: stores.db.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE 'DELETE FROM sent_message%')"), "the DELETE waiting")
        else:
            async def deleted_one() -> bool:
                return retention.statements.get("sent_messages", 0) >= 1
            await _until(deleted_one, "the first DELETE")
        await asyncio.wait_for(retention.stop(), STOP_S)
        if where == "in a statement":
            await txn.rollback()
        # A connection cut off mid-statement is ended: its session, and the lock, go as soon
        # as the server notices.
        await _until(lambda: other.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY),
                     "the other worker taking the lock")
    finally:
        # Whatever failed, the round (asleep for an hour between statements) gives its pooled
        # connection back, and the other session's row locks go with it.
        try:
            await asyncio.wait_for(retention.stop(), STOP_S)
        finally:
            await other.close(timeout=STOP_S)
    assert await stores.db.fetchval("SELECT 1") == 1  # the pool goes on working


@pytest.mark.parametrize("kind", KINDS)
async def test_each_prune_query_searches_an_index_never_the_whole_table(
        stores: Stores, kind: str) -> None:
    if stores.db.scheme != Scheme.SQLITE:
        pytest.skip("PostgreSQL's planner reads small tables whole, whatever their indexes")
    plan = [r["detail"] for r in await stores.db.fetch(
        "EXPLAIN QUERY PLAN " + oldest(kind), NOW, 1000)]
    assert plan and all(step.startswith(("SEARCH", "CORRELATED")) for step in plan), plan


async def test_a_round_that_loses_the_answer_to_its_lock_leaves_the_lock_to_the_other_workers(
        stores: Stores) -> None:
    """The server took the lock, the worker never heard so and was stopped: the lock goes with
    the session, not back to the pool with the connection."""
    if stores.db.scheme not in (Scheme.POSTGRES, Scheme.COCKROACH):
        pytest.skip("SQLite has one process: nothing to take turns with")
    url = URL(str(stores.db.url))
    assert url.host is not None and url.port is not None
    other = await asyncpg.connect(str(stores.db.url))  # another worker's session
    async with AnswerHoldingProxy(url.host, url.port, b"pg_try_advisory_lock") as proxy:
        db = create_database(str(url.with_port(proxy.port)), db_args={"min_size": 1},
                             log=logging.getLogger("dmbridge.db"))
        await db.start()
        retention = Retention(db, RetentionSettings())
        try:
            retention.start(first=0)
            await asyncio.wait_for(proxy.held.wait(), STOP_S)
            assert not await other.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY)
            stopping = asyncio.create_task(retention.stop())
            await asyncio.sleep(0)  # the round is cancelled while its answer is held ...
            proxy.release()  # ... and the connection works again afterwards
            await asyncio.wait_for(stopping, STOP_S)
            await _until(lambda: other.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY),
                         "the other worker taking the lock")
            assert await db.fetchval("SELECT 1") == 1  # the pool goes on working
        finally:
            # Held answers would keep the pool's connections from closing: let them through.
            proxy.release()
            try:
                await asyncio.wait_for(retention.stop(), STOP_S)
            finally:
                await other.close(timeout=STOP_S)
                await asyncio.wait_for(db.stop(), STOP_S)


async def test_a_round_stopped_while_the_database_stops_answering_still_stops(
        stores: Stores, caplog: pytest.LogCaptureFixture) -> None:
    """The round's lock release gets no answer: stopping ends the session after a bounded wait
    (which releases the lock) instead of waiting for the database for ever."""
    if stores.db.scheme not in (Scheme.POSTGRES, Scheme.COCKROACH):
        pytest.skip("SQLite has one process: no lock to release")
    for i in range(3):
        await sent(stores, f"old{i}", days_ago(100) + i)
    url = URL(str(stores.db.url))
    assert url.host is not None and url.port is not None
    async with AnswerHoldingProxy(url.host, url.port, b"pg_advisory_unlock(") as proxy:
        db = create_database(str(url.with_port(proxy.port)), db_args={"min_size": 1},
                             log=logging.getLogger("dmbridge.db"))
        await db.start()
        retention = Retention(db, RetentionSettings(), batch=1, pause=3600)
        try:
            retention.start(first=0)
            async def deleted_one() -> bool:
                return retention.statements.get("sent_messages", 0) >= 1
            await _until(deleted_one, "the first DELETE")
            # Asleep between two statements: stopping releases the lock, and that answer is
            # never let through.
            await asyncio.wait_for(retention.stop(), STOP_S)
            assert proxy.held.is_set()
            assert "ending the database session instead" in caplog.text
            assert await db.fetchval("SELECT 1") == 1  # the pool goes on with a new session
        finally:
            proxy.release()
            try:
                await asyncio.wait_for(retention.stop(), STOP_S)
            finally:
                await asyncio.wait_for(db.stop(), STOP_S)
