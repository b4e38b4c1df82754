"""The outbox: its table on both backends, backoff, and the delivery service (push and pull)."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web

from dmbridge import outbox as outbox_module
from dmbridge import signing
from dmbridge.config import DeliverySettings
from dmbridge.db import Stores, create_database, now_ms
from dmbridge.db.outbox import DEAD, DELIVERED, PENDING, OutboxItem
from dmbridge.delivery import backoff, finish
from dmbridge.errors import InvalidParam
from dmbridge.localhs import free_port
from dmbridge.networks import PULL, PUSH, Delivery, Network, Networks
from dmbridge.outbox import Outbox
from tests.support.webhook import WebhookReceiver
from tests.unit.test_networks import make_network

SECRET = "webhook-secret-0123456789"
USER = "@alice:example.org"
A, B = "+15550000001", "+15550000002"


async def add(stores: Stores, key: str, *, network: str = "sms", remote_id: str = A,
              user_id: str = USER, now: int = 1000, type: str = "message",
              payload: dict[str, Any] | None = None) -> int:
    item = await stores.outbox.add_now(
        network=network, remote_id=remote_id, user_id=user_id, type=type, key=key,
        payload=payload if payload is not None else {"type": type, "idempotency_key": key,
                                                     "network": network, "remote_id": remote_id,
                                                     "user_id": user_id, "room_id": "!r:x"},
        now=now,
    )
    assert item is not None
    return item


async def get(stores: Stores, item_id: int) -> OutboxItem:
    item = await stores.outbox.get(item_id)
    assert item is not None
    return item


async def pulled_at(stores: Stores, item_id: int) -> int | None:
    value = await stores.db.fetchval("SELECT pulled_at FROM outbox WHERE id=$1", item_id)
    return int(value) if value is not None else None


def ids(items: list[OutboxItem]) -> list[int]:
    return [i.id for i in items]


# --- the store ------------------------------------------------------------------------------


async def test_add_dedupes_by_idempotency_key(stores: Stores) -> None:
    first = await add(stores, "$event1", payload={"n": 1})
    again = await stores.outbox.add_now(
        network="chat", remote_id=B, user_id="@bob:example.org", type="message", key="$event1",
        payload={"n": 2}, now=2000,
    )
    assert again is None
    item = await get(stores, first)
    assert (item.network, item.remote_id, json.loads(item.payload)) == ("sms", A, {"n": 1})
    assert (item.state, item.attempts, item.next_attempt_at, item.created_at, item.queued_at) == (
        PENDING, 0, 1000, 1000, 1000)
    assert item.event() == {"id": first, "n": 1}
    other = await add(stores, "$event2")
    assert other > first


async def test_add_in_a_rolled_back_transaction_leaves_nothing(stores: Stores) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with stores.db.acquire() as conn, conn.transaction():
            await stores.outbox.add(conn, network="sms", remote_id=A, user_id=USER,
                                    type="message", key="$gone", payload={}, now=1)
            raise Boom
    assert await add(stores, "$gone") is not None  # the key is free again


async def test_due_heads_are_the_oldest_pending_item_per_lane(stores: Stores) -> None:
    a1 = await add(stores, "a1")
    b1 = await add(stores, "b1", remote_id=B)
    a2 = await add(stores, "a2")
    other_user = await add(stores, "c1", user_id="@carol:example.org")  # a lane of its own
    chat1 = await add(stores, "chat1", network="chat")
    heads = await stores.outbox.due_heads(["sms"], 5000, 10)
    assert ids(heads) == [a1, b1, other_user]
    assert ids(await stores.outbox.due_heads(["sms", "chat"], 5000, 10)) == [
        a1, b1, other_user, chat1]
    assert ids(await stores.outbox.due_heads(["sms"], 5000, 2)) == [a1, b1]
    assert await stores.outbox.due_heads([], 5000, 10) == []
    assert await stores.outbox.due_heads(["sms"], 999, 10) == []  # nothing is due yet

    await stores.outbox.delivered(a1, 1, 6000)
    assert ids(await stores.outbox.due_heads(["sms"], 6000, 10)) == [b1, a2, other_user]
    assert (await get(stores, a1)).state == DELIVERED


async def test_a_head_not_yet_due_blocks_its_lane(stores: Stores) -> None:
    a1 = await add(stores, "a1")
    await add(stores, "a2")
    b1 = await add(stores, "b1", remote_id=B)
    await stores.outbox.retry_later(a1, 1, 9000, "HTTP 503")
    assert ids(await stores.outbox.due_heads(["sms"], 5000, 10)) == [b1]
    assert ids(await stores.outbox.due_heads(["sms"], 9000, 10)) == [a1, b1]
    item = await get(stores, a1)
    assert (item.attempts, item.next_attempt_at, item.last_error) == (1, 9000, "HTTP 503")
    assert await stores.outbox.next_due_at(["sms"]) == 1000
    assert await stores.outbox.next_due_at(["chat"]) is None
    assert await stores.outbox.next_due_at([]) is None


async def test_lease_is_exclusive_until_it_expires(stores: Stores) -> None:
    a1 = await add(stores, "a1")
    await add(stores, "a2")
    assert await stores.outbox.lease(a1, 2000, 3000)
    assert not await stores.outbox.lease(a1, 2500, 3500)
    assert not await stores.outbox.lease(a1, 3000, 4000)  # still held at the very end
    assert (await get(stores, a1)).attempts == 1  # an attempt counts when it starts
    # Leased: neither it nor the rest of its lane is due.
    assert await stores.outbox.due_heads(["sms"], 2500, 10) == []
    # a2 has been due since 1000, but it waits behind a1: nothing can go before the lease ends.
    assert await stores.outbox.next_due_at(["sms"]) == 3000
    # Once the lease ran out, the item is due again and can be leased again.
    assert ids(await stores.outbox.due_heads(["sms"], 3001, 10)) == [a1]
    assert await stores.outbox.lease(a1, 3001, 4000)
    assert (await get(stores, a1)).attempts == 2
    await stores.outbox.delivered(a1, 2, 3500, "")
    assert not await stores.outbox.lease(a1, 9000, 10000)  # no longer pending


async def test_give_back_gives_up_leases(stores: Stores) -> None:
    a1 = await add(stores, "a1")
    b1 = await add(stores, "b1", remote_id=B)
    c1 = await add(stores, "c1", user_id="@carol:example.org")
    for item_id in (a1, b1, c1):
        assert await stores.outbox.lease(item_id, 2000, 60_000, f"t{item_id}")
    await stores.outbox.give_back([])
    await stores.outbox.give_back([await get(stores, a1), await get(stores, b1)])
    assert ids(await stores.outbox.due_heads(["sms"], 2001, 10)) == [a1, b1]
    assert not await stores.outbox.lease(c1, 2001, 60_000)
    assert (await get(stores, a1)).state == PENDING


async def test_only_the_lease_holder_changes_a_leased_item(stores: Stores) -> None:
    a1 = await add(stores, "a1")
    assert await stores.outbox.lease(a1, 2000, 60_000, "mine")
    # Another worker's token (its lease ran out and was taken since) changes nothing.
    assert not await stores.outbox.renew(a1, "theirs", 90_000)
    assert not await stores.outbox.retry_later(a1, 1, 5000, "HTTP 503", "theirs")
    assert not await stores.outbox.kill(a1, 1, "gave up", 3000, "theirs")
    assert await stores.outbox.delivered_all([(a1, "theirs")], 3000) == set()
    # So does a change naming no token (meant for an item nobody holds, a pulled one).
    assert not await stores.outbox.retry_later(a1, 1, 5000, "HTTP 503")
    assert not await stores.outbox.kill(a1, 1, "gave up", 3000)
    await stores.outbox.delivered(a1, 1, 3000)
    await stores.outbox.give_back([OutboxItem(**{**(await get(stores, a1)).__dict__,
                                                 "lease_token": "theirs"})])
    item = await get(stores, a1)
    assert (item.state, item.attempts, item.lease_until, item.lease_token) == (
        PENDING, 1, 60_000, "mine")
    # The holder's do.
    assert await stores.outbox.renew(a1, "mine", 90_000)
    assert await stores.outbox.retry_later(a1, 1, 5000, "HTTP 503", "mine")
    item = await get(stores, a1)
    assert (item.next_attempt_at, item.lease_until, item.lease_token) == (5000, None, None)
    assert await stores.outbox.lease(a1, 6000, 60_000, "again")
    assert await stores.outbox.delivered_all([(a1, "again")], 7000) == {a1}
    assert (await get(stores, a1)).state == DELIVERED


async def test_a_delivered_mark_never_lands_on_a_new_row_with_the_same_id(
    stores: Stores
) -> None:
    old = await add(stores, "old")
    assert await stores.outbox.lease(old, 2000, 60_000, "old-lease")
    # The row goes (forgotten) before its delivery is marked, and a new reply takes its id
    # (as SQLite does with the largest rowid).
    await stores.db.execute("DELETE FROM outbox WHERE id=$1", old)
    await stores.db.execute(
        "INSERT INTO outbox (id, network, remote_id, user_id, type, idempotency_key, payload,"
        " state, next_attempt_at, created_at, queued_at)"
        " VALUES ($1, 'sms', $2, $3, 'message', 'new', '{}', 'pending', 3000, 3000, 3000)",
        old, A, USER,
    )
    assert await stores.outbox.delivered_all([(old, "old-lease")], 4000) == set()
    assert not await stores.outbox.kill(old, 1, "gave up", 4000, "old-lease")
    assert (await get(stores, old)).state == PENDING  # the new reply is still to deliver
    assert ids(await stores.outbox.due_heads(["sms"], 5000, 10)) == [old]


async def test_a_lanes_next_items_are_leased_in_order_up_to_one_that_cannot_go(
    stores: Stores
) -> None:
    a = [await add(stores, f"a{i}", now=1000) for i in range(1, 6)]
    other = await add(stores, "b1", remote_id=B)
    await stores.outbox.retry_later(a[3], 1, 9000, "HTTP 503")  # a4 not due before 9000
    lane = ("sms", A, USER)
    got = await stores.outbox.lease_next(lane, a[0], 2000, 60_000, "t1", 16)
    assert ids(got) == [a[1], a[2]]  # after a1 (delivered here), up to a4, not due
    assert {i.lease_token for i in got} == {"t1"} and all(i.attempts == 1 for i in got)
    assert await stores.outbox.lease_next(lane, a[2], 2000, 60_000, "t2", 16) == []
    # At most the limit, and nothing of another lane.
    assert ids(await stores.outbox.lease_next(lane, a[3], 9000, 60_000, "t3", 1)) == [a[4]]
    assert (await get(stores, other)).lease_token is None


async def test_a_lane_being_leased_by_one_worker_is_not_leased_in_parts_by_another(
    stores: Stores, request: pytest.FixtureRequest
) -> None:
    if not stores.outbox.locks_lanes:
        pytest.skip("one process delivers on SQLite")
    a1, a2, a3 = [await add(stores, f"a{i}") for i in (1, 2, 3)]
    lane = ("sms", A, USER)
    other_db = create_database(request.getfixturevalue("module_pg_url"), db_args={},
                               log=logging.getLogger("dmbridge.db.other"))
    await other_db.start()
    outside = contextvars.copy_context()  # a connection acquired is shared with tasks within
    try:
        async with other_db.acquire() as other, other.transaction():
            # Another worker leases the lane's head (as lease() does) and has not committed.
            await other.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(9) || $2 || chr(9)"
                " || $3, 0))", *lane)
            await other.execute(
                "UPDATE outbox SET lease_until=60000, lease_token='other', attempts=attempts+1"
                " WHERE id=$1", a1)
            # Meanwhile this worker, having delivered nothing of the lane, looks for its items.
            mine = asyncio.create_task(
                stores.outbox.lease_next(lane, 0, 2000, 60_000, "mine", 16), context=outside)
            await asyncio.sleep(0.3)  # its statements are sent (and wait) before the commit
    finally:
        await other_db.stop()
    # It leases nothing behind the other worker's head: that would go out of order.
    assert await mine == []
    assert [(await get(stores, i)).lease_token for i in (a1, a2, a3)] == ["other", None, None]


async def test_a_reply_queued_while_another_worker_queues_in_its_lane_waits_its_turn(
    stores: Stores, request: pytest.FixtureRequest
) -> None:
    """An item of a lane committed after a later id was taken would go out beside it."""
    if not stores.outbox.locks_lanes:
        pytest.skip("writers take turns on SQLite")
    other_db = create_database(request.getfixturevalue("module_pg_url"), db_args={},
                               log=logging.getLogger("dmbridge.db.other"))
    await other_db.start()
    outside = contextvars.copy_context()  # a connection acquired is shared with tasks within

    async def record() -> OutboxItem | None:
        async with stores.db.acquire() as conn, conn.transaction():
            return await stores.outbox.add_leased(
                conn, network="sms", remote_id=A, user_id=USER, type="message", key="reply",
                payload={"n": 2}, now=1000, lease_until=60_000, token="mine")

    try:
        async with other_db.acquire() as other, other.transaction():
            # Another worker queues a notice for the lane, and has not committed yet.
            notice = await stores.outbox.add(
                other, network="sms", remote_id=A, user_id=USER, type="message", key="notice",
                payload={"n": 1}, now=1000)
            # Meanwhile this worker records a reply to the same DM.
            mine = asyncio.create_task(record(), context=outside)
            await asyncio.sleep(0.3)  # its statements are sent (and wait) before the commit
    finally:
        await other_db.stop()
    reply = await mine
    assert reply is not None and notice is not None
    assert reply.lease_token is None  # behind the notice: not delivered beside it
    assert reply.id > notice
    # The notice is the lane's head, and goes first.
    assert ids(await stores.outbox.due_heads(["sms"], 2000, 10)) == [notice]


async def test_an_item_is_leased_only_while_it_is_its_lanes_head_and_the_lane_is_free(
    stores: Stores
) -> None:
    a1, a2, a3 = [await add(stores, f"a{i}") for i in (1, 2, 3)]
    assert ids(await stores.outbox.due_heads(["sms"], 2000, 10)) == [a1]
    # Its head was a dead letter made pending again: a2 is no longer the lane's head.
    assert not await stores.outbox.lease(a2, 2000, 60_000, "late")
    assert await stores.outbox.lease(a1, 2000, 60_000, "head")
    assert await stores.outbox.kill(a1, 1, "gave up", 2000, "head")
    assert await stores.outbox.lease_next(("sms", A, USER), a1, 2000, 60_000, "lane", 1)
    assert await stores.outbox.requeue("sms", [a1], 3000) == [a1]
    # a1 is the head again, but a2 is being delivered: a1 waits until the lane is free.
    assert not await stores.outbox.lease(a1, 3000, 60_000, "requeued")
    assert (await get(stores, a3)).lease_token is None


async def test_kill_dead_letters_and_requeue(stores: Stores) -> None:
    a1 = await add(stores, "a1", now=1000)
    a2 = await add(stores, "a2", now=1000)
    b1 = await add(stores, "b1", remote_id=B, now=1000)
    c1 = await add(stores, "c1", network="chat", now=1000)
    assert await stores.outbox.kill(a1, 3, "gave up", 2000)
    assert not await stores.outbox.kill(a1, 4, "again", 2100)  # already dead
    assert await stores.outbox.kill(b1, 2, "gave up too", 2200)
    assert await stores.outbox.kill(c1, 1, "chat's", 2300)
    dead = await get(stores, a1)
    assert (dead.state, dead.attempts, dead.last_error, dead.finished_at) == (
        DEAD, 3, "gave up", 2000)
    # A dead head no longer holds its lane up.
    assert ids(await stores.outbox.due_heads(["sms"], 5000, 10)) == [a2]
    assert ids(await stores.outbox.dead_letters("sms", 10)) == [a1, b1]
    assert ids(await stores.outbox.dead_letters("sms", 1)) == [a1]
    assert ids(await stores.outbox.dead_letters(None, 10)) == [a1, b1, c1]
    assert ids(await stores.outbox.dead_letters("chat", 10)) == [c1]

    assert await stores.outbox.requeue("sms", [], 3000) == []
    assert await stores.outbox.requeue("sms", [c1, a2], 3000) == []  # other network / alive
    assert await stores.outbox.requeue("sms", [a1], 3000) == [a1]
    again = await get(stores, a1)
    assert (again.state, again.attempts, again.next_attempt_at, again.queued_at,
            again.finished_at, again.created_at) == (PENDING, 0, 3000, 3000, None, 1000)
    assert (await get(stores, c1)).state == DEAD
    assert await stores.outbox.requeue("sms", None, 4000) == [b1]
    assert (await get(stores, b1)).queued_at == 4000
    assert (await get(stores, c1)).state == DEAD
    assert await stores.outbox.dead_letters("sms", 10) == []
    assert await stores.outbox.requeue("chat", None, 5000) == [c1]


async def test_requeue_forgets_lease_and_pull(stores: Stores) -> None:
    a1 = await add(stores, "a1", network="chat")
    assert ids(await stores.outbox.pull("chat", 0, 2000, 0, 10)) == [a1]
    assert await stores.outbox.kill(a1, 1, "not acknowledged", 3000)
    assert await stores.outbox.requeue("chat", [a1], 4000) == [a1]
    assert await pulled_at(stores, a1) is None
    assert ids(await stores.outbox.pull("chat", a1, 4100, 0, 10)) == [a1]  # handed out again


async def test_pull_hands_out_new_late_and_overdue_items(stores: Stores) -> None:
    x1 = await add(stores, "x1", network="chat")
    await add(stores, "s1", network="sms")
    x2 = await add(stores, "x2", network="chat")
    x3 = await add(stores, "x3", network="chat")
    x4 = await add(stores, "x4", network="chat")

    first = await stores.outbox.pull("chat", 0, 10_000, 0, 2)
    assert ids(first) == [x1, x2]
    assert await pulled_at(stores, x1) == 10_000 and await pulled_at(stores, x3) is None
    assert (await get(stores, x1)).attempts == 1
    # A late commit: x3 was not visible when x4 was handed out, so the platform's cursor is
    # already past it. It still comes, because it was never handed out.
    await stores.db.execute("UPDATE outbox SET pulled_at=10000 WHERE id=$1", x4)
    assert ids(await stores.outbox.pull("chat", x4, 10_100, 0, 10)) == [x3]
    assert await pulled_at(stores, x3) == 10_100
    # Handed out, not acknowledged: nothing until the redelivery cutoff passes them.
    assert await stores.outbox.pull("chat", x4, 10_200, 10_000, 10) == []
    again = await stores.outbox.pull("chat", x4, 20_000, 10_001, 10)
    assert ids(again) == [x1, x2, x4]
    assert await pulled_at(stores, x1) == 20_000
    assert (await get(stores, x1)).attempts == 2
    # id > after is handed out even if just pulled (the platform may rewind its cursor).
    assert ids(await stores.outbox.pull("chat", x2, 20_001, 0, 10)) == [x3, x4]
    # Finished items never come back, whatever the cursor.
    await stores.outbox.delivered(x1, 1, 20_002)
    assert await stores.outbox.kill(x2, 1, "dead", 20_002)
    assert ids(await stores.outbox.pull("chat", 0, 20_003, 99_999, 10)) == [x3, x4]


async def test_ack_only_takes_the_networks_pending_items(stores: Stores) -> None:
    x1 = await add(stores, "x1", network="chat")
    x2 = await add(stores, "x2", network="chat")
    s1 = await add(stores, "s1", network="sms")
    x3 = await add(stores, "x3", network="chat")
    assert await stores.outbox.kill(x3, 1, "dead", 1500)
    assert await stores.outbox.ack("chat", [], 2000) == 0
    assert await stores.outbox.ack("chat", [x1, s1, x3, 999_999], 2000) == 1
    assert (await get(stores, x1)).state == DELIVERED
    assert (await get(stores, x1)).finished_at == 2000
    assert (await get(stores, s1)).state == PENDING
    assert (await get(stores, x3)).state == DEAD
    assert (await get(stores, x2)).state == PENDING
    assert await stores.outbox.ack("chat", [x1], 3000) == 0  # already acknowledged
    assert ids(await stores.outbox.pull("chat", 0, 4000, 0, 10)) == [x2]


async def test_expired_lists_pending_items_queued_too_long_ago(stores: Stores) -> None:
    old = await add(stores, "old", network="chat", now=1000)
    await add(stores, "new", network="chat", now=5000)
    done = await add(stores, "done", network="chat", now=1000)
    await add(stores, "other", network="sms", now=1000)
    await stores.outbox.delivered(done, 1, 1500)
    assert ids(await stores.outbox.expired(["chat"], 5000, 10)) == [old]
    assert ids(await stores.outbox.expired(["chat"], 1000, 10)) == []  # strictly before
    assert len(await stores.outbox.expired(["chat", "sms"], 5000, 10)) == 2
    assert len(await stores.outbox.expired(["chat", "sms"], 5000, 1)) == 1
    assert await stores.outbox.expired([], 5000, 10) == []


# --- backoff --------------------------------------------------------------------------------


SLOW = DeliverySettings(initial_backoff=2.0, max_backoff=30.0)


@pytest.mark.parametrize(("attempt", "nominal"), [(0, 2.0), (1, 2.0), (2, 4.0), (3, 8.0),
                                                  (4, 16.0), (5, 30.0), (60, 30.0)])
def test_backoff_doubles_up_to_the_cap_with_equal_jitter(attempt: int, nominal: float) -> None:
    rng = random.Random(1234)
    waits = [backoff(attempt, SLOW, rng) for _ in range(500)]
    assert all(nominal / 2 <= w <= nominal for w in waits)
    # The jitter really spreads the waits over the range, not one fixed value.
    assert min(waits) < nominal * 0.55 and max(waits) > nominal * 0.95


def test_backoff_is_reproducible_with_a_seed_and_grows() -> None:
    assert [backoff(n, SLOW, random.Random(7)) for n in range(1, 8)] == [
        backoff(n, SLOW, random.Random(7)) for n in range(1, 8)]
    rng = random.Random(99)
    means = [sum(backoff(n, SLOW, rng) for _ in range(200)) / 200 for n in (1, 2, 3, 4)]
    assert means == sorted(means) and means[3] > 5 * means[0]


def test_backoff_at_the_largest_allowed_attempt_count() -> None:
    # delivery.max_attempts may be 1000: the doubling must not overflow on the way there.
    wait = backoff(1000, DeliverySettings(initial_backoff=3600, max_backoff=86400),
                   random.Random(1))
    assert 43200 <= wait <= 86400


# --- the delivery service -------------------------------------------------------------------


def webhook_network(url: str, network_id: str = "sms") -> Network:
    base = make_network(network_id)
    return Network(**{**base.__dict__, "delivery": Delivery(mode=PUSH, url=url, secret=SECRET)})


def pull_network(network_id: str = "chat") -> Network:
    base = make_network(network_id, pattern=r"[A-Za-z0-9+]{1,32}",
                        tokens=("chat-token-0123456789",))
    assert base.delivery.mode == PULL
    return base


FAST = DeliverySettings(max_attempts=3, max_age=60, initial_backoff=0.02, max_backoff=0.05,
                        timeout=3, concurrency=4, pull_ack_timeout=30, pull_max_wait=10)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0,
                     what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def all_items(stores: Stores) -> list[OutboxItem]:
    rows = await stores.db.fetch("SELECT id FROM outbox ORDER BY id")
    return [await get(stores, int(r["id"])) for r in rows]


@pytest.fixture
async def rx() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(SECRET) as receiver:
        yield receiver


@pytest.fixture
async def make_outbox(stores: Stores) -> AsyncIterator[Callable[..., Awaitable[Outbox]]]:
    started: list[Outbox] = []

    async def make(*networks: Network, settings: DeliverySettings = FAST,
                   start: bool = True) -> Outbox:
        box = Outbox(stores=stores, networks=Networks(networks), settings=settings)
        if start:
            await box.start()
            started.append(box)
        return box

    yield make
    for box in started:
        await box.stop()


class Receiver:
    """A webhook whose answers the test writes: ``handler(payload) -> status``."""

    def __init__(self, handler: Callable[[dict[str, Any]], Awaitable[int]]) -> None:
        self.handler = handler
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        status = await self.handler(await request.json())
        return web.json_response({}, status=status)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_push_delivers_signed_items_with_headers(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    network = webhook_network(rx.url)
    payload = {"type": "message", "idempotency_key": "$e1", "text": "héllo"}
    item_id = await add(stores, "$e1", now=now_ms(), payload=payload)
    await make_outbox(network)
    [d] = await rx.wait_accepted(1, timeout=10)
    assert d.json == {"id": item_id, **payload}
    assert d.signature_ok
    assert signing.verify(SECRET, d.headers["X-Dmbridge-Timestamp"],
                          d.headers["X-Dmbridge-Signature"], d.body)
    assert d.headers["Idempotency-Key"] == "$e1"
    assert d.headers["X-Dmbridge-Delivery"] == str(item_id)
    assert d.headers["X-Dmbridge-Attempt"] == "1"
    assert d.headers["Content-Type"] == "application/json"

    async def delivered() -> bool:
        return (await get(stores, item_id)).state == DELIVERED

    await wait_until(delivered, what="the item to be marked delivered")
    item = await get(stores, item_id)
    assert (item.attempts, item.last_error) == (1, None)
    await asyncio.sleep(0.2)
    assert len(rx.attempts) == 1  # delivered once, not again


async def test_lanes_go_in_order_and_side_by_side(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    arrivals: list[str] = []
    b_done = asyncio.Event()
    failed_once: set[str] = set()

    async def handle(payload: dict[str, Any]) -> int:
        key = payload["idempotency_key"]
        arrivals.append(key)
        if key == "a1":
            # Lane A's head is held until lane B is through: only possible side by side.
            await asyncio.wait_for(b_done.wait(), 5)
        if key == "a2" and key not in failed_once:
            failed_once.add(key)
            return 503  # a3 must wait for a2's retry
        if key == "b3":
            b_done.set()
        return 200

    async with Receiver(handle) as receiver:
        now = now_ms()
        for i in (1, 2, 3):
            await add(stores, f"a{i}", remote_id=A, now=now)
            await add(stores, f"b{i}", remote_id=B, now=now)
        await make_outbox(webhook_network(receiver.url))

        async def all_delivered() -> bool:
            return all(i.state == DELIVERED for i in await all_items(stores))

        await wait_until(all_delivered, what="all six items to be delivered")
    assert [k for k in arrivals if k.startswith("a")] == ["a1", "a2", "a2", "a3"]
    assert [k for k in arrivals if k.startswith("b")] == ["b1", "b2", "b3"]
    assert arrivals.index("b3") < arrivals.index("a2")
    attempts = {json.loads(i.payload)["idempotency_key"]: i.attempts
                for i in await all_items(stores)}
    assert attempts == {"a1": 1, "a2": 2, "a3": 1, "b1": 1, "b2": 1, "b3": 1}


async def test_more_than_500_dms_at_once_each_get_their_replies_in_order(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    # More lanes looked into at once than SQLite allows terms in one compound statement.
    lanes, per_lane = 510, 3
    arrivals: dict[str, list[int]] = {}

    async def handle(payload: dict[str, Any]) -> int:
        lane, n = payload["idempotency_key"].split("/")
        arrivals.setdefault(lane, []).append(int(n))
        return 200

    async with Receiver(handle) as receiver:
        now = now_ms()
        async with stores.db.acquire() as conn, conn.transaction():
            for n in range(per_lane):
                for lane in range(lanes):
                    key = f"{lane}/{n}"
                    await stores.outbox.add(
                        conn, network="sms", remote_id=f"+1555{lane:07d}", user_id=USER,
                        type="message", key=key, now=now,
                        payload={"type": "message", "idempotency_key": key})
        # The recording of the homeserver's transactions hands them all over at once, as
        # queued behind other items (not leased): every lane's next items are looked for.
        waiting = await stores.outbox.expired(["sms"], now + 1, lanes * per_lane)
        assert len(waiting) == lanes * per_lane
        box = await make_outbox(webhook_network(receiver.url))
        box.take(waiting)

        async def all_delivered() -> bool:
            return await stores.db.fetchval(
                "SELECT COUNT(*) FROM outbox WHERE state='delivered'") == lanes * per_lane

        await wait_until(all_delivered, timeout=60, what="every reply to be delivered")
    assert len(arrivals) == lanes
    assert all(got == list(range(per_lane)) for got in arrivals.values())


async def test_replies_recorded_at_once_are_leased_only_as_far_as_a_worker_may_hold(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    rx.stall()
    settings = DeliverySettings(**{**FAST.__dict__, "concurrency": 1})  # 32 held at most
    box = await make_outbox(webhook_network(rx.url), settings=settings)
    now = now_ms()
    handed: list[OutboxItem] = []
    async with stores.db.acquire() as conn, conn.transaction():
        # One homeserver transaction: replies to 40 DMs, each first in its lane.
        for n in range(40):
            lease = box.lease("sms", now)
            item = await (stores.outbox.add(
                conn, network="sms", remote_id=f"+1555{n:07d}", user_id=USER, type="message",
                key=f"k{n}", payload={"n": n}, now=now) if lease is None else
                stores.outbox.add_leased(
                    conn, network="sms", remote_id=f"+1555{n:07d}", user_id=USER,
                    type="message", key=f"k{n}", payload={"n": n}, now=now,
                    lease_until=lease[0], token=lease[1]))
            if isinstance(item, OutboxItem):
                handed.append(item)
    box.take(handed)
    leased = await stores.db.fetchval("SELECT COUNT(*) FROM outbox WHERE lease_until IS NOT NULL")
    assert leased == 32  # the rest wait in the database
    assert box.lease("sms", now) is None


async def test_a_lease_the_recording_did_not_use_is_free_again(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    settings = DeliverySettings(**{**FAST.__dict__, "concurrency": 1})  # 32 held at most
    box = await make_outbox(webhook_network("http://127.0.0.1:9/hook"), settings=settings)
    now = now_ms()
    leases = [box.lease("sms", now) for _ in range(32)]
    assert None not in leases and box.lease("sms", now) is None
    first = leases[0]
    assert first is not None
    box.unused(first[1])  # its reply was not its lane's first
    assert box.lease("sms", now) is not None
    # Leases for a transaction that failed count until they would have run out.
    assert box.lease("sms", now + settings.timeout * 1000 + 5_001 + 1) is not None


async def test_a_lease_about_to_run_out_is_renewed_before_its_post(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    """A POST may take ``delivery.timeout``: when it starts, its lease covers that much."""
    seen: list[tuple[int, int | None, str | None]] = []

    async def handle(payload: dict[str, Any]) -> int:
        row = await get(stores, int(payload["id"]))
        seen.append((now_ms(), row.lease_until, row.lease_token))
        return 200

    async with Receiver(handle) as receiver:
        item_id = await add(stores, "a1", now=now_ms())
        now = now_ms()
        # Leased (by the recording, say) a while ago: 1 s is left of it, the timeout is 3 s.
        assert await stores.outbox.lease(item_id, now, now + 1000, "recorded")
        box = await make_outbox(webhook_network(receiver.url))
        box.take([await get(stores, item_id)])

        async def delivered() -> bool:
            return (await get(stores, item_id)).state == DELIVERED

        await wait_until(delivered, what="the item to be delivered")
    [(posted_at, lease_until, token)] = seen
    assert token == "recorded"  # still the same holder's lease ...
    assert lease_until is not None and lease_until >= posted_at + FAST.timeout * 1000  # renewed


async def test_a_lease_leaves_time_to_mark_its_item_delivered_after_the_longest_post(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    seen: list[tuple[int, int | None]] = []

    async def handle(payload: dict[str, Any]) -> int:
        row = await get(stores, int(payload["id"]))
        seen.append((now_ms(), row.lease_until))
        return 200

    async with Receiver(handle) as receiver:
        item_id = await add(stores, "a1", now=now_ms())
        now = now_ms()
        # 1.5 s more than the timeout (3 s) is left of its lease.
        assert await stores.outbox.lease(item_id, now, now + 4500, "recorded")
        box = await make_outbox(webhook_network(receiver.url))
        box.take([await get(stores, item_id)])

        async def delivered() -> bool:
            return (await get(stores, item_id)).state == DELIVERED

        await wait_until(delivered, what="the item to be delivered")
    [(posted_at, lease_until)] = seen
    # Renewed: a POST taking the whole timeout still leaves 2.5 s (half the lease's slack).
    assert lease_until is not None and lease_until >= posted_at + (FAST.timeout + 2.5) * 1000


@pytest.mark.parametrize(("concurrency", "expected"), [(1, 1), (4, 3)])
async def test_concurrency_limits_deliveries_in_flight(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]], concurrency: int,
    expected: int
) -> None:
    in_flight, peak = 0, 0

    async def handle(payload: dict[str, Any]) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.15)
        in_flight -= 1
        return 200

    async with Receiver(handle) as receiver:
        now = now_ms()
        for remote_id in ("+15550000001", "+15550000002", "+15550000003"):
            await add(stores, f"k{remote_id}", remote_id=remote_id, now=now)
        settings = DeliverySettings(**{**FAST.__dict__, "concurrency": concurrency})
        await make_outbox(webhook_network(receiver.url), settings=settings)

        async def all_delivered() -> bool:
            return all(i.state == DELIVERED for i in await all_items(stores))

        await wait_until(all_delivered, what="all three items to be delivered")
    assert peak == expected


async def test_stop_releases_the_lease_of_a_delivery_in_flight(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    rx.stall()
    item_id = await add(stores, "$e1", now=now_ms())
    box = await make_outbox(webhook_network(rx.url))
    await rx.wait_attempts(1, timeout=10)
    assert not await stores.outbox.lease(item_id, now_ms(), now_ms() + 1000)  # held
    await box.stop()
    item = await get(stores, item_id)
    # An attempt counts when it starts (README: an interrupted one still counts).
    assert (item.state, item.attempts, item.last_error) == (PENDING, 1, None)
    # Due again at once, for the next worker to start.
    assert ids(await stores.outbox.due_heads(["sms"], now_ms(), 10)) == [item_id]


async def test_a_delivery_answered_while_stopping_is_marked_delivered(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    posted, answer = asyncio.Event(), asyncio.Event()

    async def handle(payload: dict[str, Any]) -> int:
        posted.set()
        await answer.wait()
        return 200

    async with Receiver(handle) as receiver:
        item_id = await add(stores, "a1", now=now_ms())
        box = await make_outbox(webhook_network(receiver.url))
        await asyncio.wait_for(posted.wait(), 10)
        due_heads = stores.outbox.due_heads

        async def slow_search(*args: Any) -> list[OutboxItem]:
            # The stop finds the delivery loop in a database call that runs to its end;
            # meanwhile the platform answers.
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                answer.set()
                for _ in range(500):
                    if item_id not in box.deliverer._in_flight:
                        break
                    await asyncio.sleep(0.01)
                raise
            return await due_heads(*args)

        stores.outbox.due_heads = slow_search  # type: ignore[method-assign]
        box.deliverer.wake({"sms"})
        await asyncio.sleep(0.1)
        await box.stop()
    item = await get(stores, item_id)
    assert (item.state, item.lease_token) == (DELIVERED, None)  # not sent again by anyone


async def test_a_reply_handed_over_after_a_stop_is_given_back(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    item_id = await add(stores, "a1", now=now_ms())
    now = now_ms()
    # Leased as it was recorded, and committed as the worker stops.
    assert await stores.outbox.lease(item_id, now, now + 60_000, "recorded")
    box = await make_outbox(webhook_network("http://127.0.0.1:9/hook"))
    await box.stop()
    box.take([await get(stores, item_id)])

    async def given_back() -> bool:
        return (await get(stores, item_id)).lease_until is None

    await wait_until(given_back, timeout=3, what="the lease to be given back")
    assert ids(await stores.outbox.due_heads(["sms"], now_ms(), 10)) == [item_id]


async def test_a_lease_taken_as_the_worker_stops_is_given_back(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    item_id = await add(stores, "a1", now=now_ms())
    asked, go, leased = asyncio.Event(), asyncio.Event(), asyncio.Event()
    lease = stores.outbox.lease

    async def slow_lease(*args: Any) -> bool:
        async def sent() -> bool:  # the statement is on its way: the database runs it anyway
            await go.wait()
            try:
                return await lease(*args)
            finally:
                leased.set()

        asked.set()
        return await asyncio.shield(sent())

    stores.outbox.lease = slow_lease  # type: ignore[method-assign]
    box = await make_outbox(webhook_network("http://127.0.0.1:9/hook"))
    await asyncio.wait_for(asked.wait(), 10)
    stopping = asyncio.create_task(box.stop())
    await asyncio.sleep(0.05)
    go.set()
    await stopping
    await asyncio.wait_for(leased.wait(), 10)
    item = await get(stores, item_id)
    assert (item.state, item.lease_until, item.attempts) == (PENDING, None, 0)  # due at once


async def test_retries_then_dead_letter_and_one_failure_notice(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    rx.down(500)
    network = webhook_network(rx.url)
    payload = {"type": "message", "idempotency_key": "$e1", "room_id": "!r:x",
               "ghost_id": "@dm_sms_=2b15550000001:example.org"}
    item_id = await add(stores, "$e1", now=now_ms(), payload=payload)
    box = await make_outbox(network)

    async def both_dead() -> bool:
        items = await all_items(stores)
        return len(items) == 2 and all(i.state == DEAD for i in items)

    await wait_until(both_dead, what="the item and its failure notice to be dead letters")
    dead, notice = await all_items(stores)
    assert dead.id == item_id
    assert dead.attempts == 3
    assert dead.last_error is not None
    assert dead.last_error.startswith("gave up after 3 attempt(s); last: HTTP 500")
    first = [d for d in rx.attempts if d.idempotency_key == "$e1"]
    assert [d.headers["X-Dmbridge-Attempt"] for d in first] == ["1", "2", "3"]
    assert all(d.signature_ok for d in first)

    assert (notice.type, notice.network, notice.remote_id, notice.user_id) == (
        "delivery.failed", "sms", A, USER)
    event = notice.event()
    assert event["idempotency_key"] == notice.idempotency_key
    assert event["idempotency_key"].startswith("delivery.failed:$e1:")
    assert event["room_id"] == "!r:x"
    assert event["ghost_id"] == payload["ghost_id"]
    assert event["failed"] == {"id": item_id, "type": "message", "idempotency_key": "$e1",
                               "attempts": 3, "error": dead.last_error}
    # The notice was tried as often, and its death queued nothing more.
    assert [d.headers["X-Dmbridge-Attempt"] for d in rx.attempts
            if d.idempotency_key == notice.idempotency_key] == ["1", "2", "3"]
    assert notice.attempts == 3
    await asyncio.sleep(0.3)
    assert len(await all_items(stores)) == 2

    # Retried by an operator: attempts start again from 1, and it goes through.
    rx.up()
    assert await box.retry(network, [item_id]) == [item_id]
    [ok] = await rx.wait_accepted(1, timeout=10)
    assert (ok.idempotency_key, ok.headers["X-Dmbridge-Attempt"]) == ("$e1", "1")

    async def delivered() -> bool:
        return (await get(stores, item_id)).state == DELIVERED

    await wait_until(delivered, what="the requeued item to be delivered")
    assert (await get(stores, notice.id)).state == DEAD


async def test_retry_after_in_seconds_is_honoured(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    rx.down(429, retry_after="30")
    item_id = await add(stores, "$e1", now=now_ms())
    await make_outbox(webhook_network(rx.url))

    async def retried() -> bool:  # a lease already counts the attempt; wait for its outcome
        return (await get(stores, item_id)).last_error is not None

    await wait_until(retried, what="the first failure to be recorded")
    item = await get(stores, item_id)
    sent_at = rx.attempts[0].received_at * 1000
    assert item.state == PENDING
    assert 29_000 <= item.next_attempt_at - sent_at <= 31_000
    assert item.last_error is not None and item.last_error.startswith("HTTP 429")
    await asyncio.sleep(0.3)
    assert len(rx.attempts) == 1  # backoff alone (0.05 s at most) would have retried by now


async def test_retry_after_as_an_http_date_is_honoured(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    when = datetime.fromtimestamp(time.time() + 20, UTC)
    rx.down(503, retry_after=format_datetime(when, usegmt=True))
    item_id = await add(stores, "$e1", now=now_ms())
    await make_outbox(webhook_network(rx.url))

    async def retried() -> bool:  # a lease already counts the attempt; wait for its outcome
        return (await get(stores, item_id)).last_error is not None

    await wait_until(retried, what="the first failure to be recorded")
    item = await get(stores, item_id)
    assert abs(item.next_attempt_at - when.timestamp() * 1000) <= 1500


async def test_backoff_wins_over_a_shorter_retry_after(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    rx.down(503, retry_after="1")
    item_id = await add(stores, "$e1", now=now_ms())
    settings = DeliverySettings(**{**FAST.__dict__, "initial_backoff": 6, "max_backoff": 6})
    await make_outbox(webhook_network(rx.url), settings=settings)

    async def retried() -> bool:  # a lease already counts the attempt; wait for its outcome
        return (await get(stores, item_id)).last_error is not None

    await wait_until(retried, what="the first failure to be recorded")
    wait = (await get(stores, item_id)).next_attempt_at - rx.attempts[0].received_at * 1000
    assert 2_900 <= wait <= 6_100


@pytest.mark.parametrize("value", [
    # More digits than a float holds: float() gives inf, then int(inf * 1000) raises.
    pytest.param("9" * 400, id="huge"),
    # "²": str.isdigit() says yes, float() raises ValueError.
    pytest.param("\u00b2", id="superscript-two"),
])
async def test_an_absurd_retry_after_counts_as_a_failed_attempt(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]],
    value: str,
) -> None:
    rx.down(503, retry_after=value)
    queued = now_ms()
    item_id = await add(stores, "$e1", now=queued)
    settings = DeliverySettings(**{**FAST.__dict__, "initial_backoff": 30, "max_backoff": 30})
    await make_outbox(webhook_network(rx.url), settings=settings)

    async def recorded() -> bool:
        return (await get(stores, item_id)).last_error is not None

    await wait_until(recorded, timeout=2, what="the failed attempt to be recorded")
    item = await get(stores, item_id)
    assert item.last_error is not None and item.last_error.startswith("HTTP 503")
    assert (item.state, item.attempts) == (PENDING, 1)
    assert queued < item.next_attempt_at <= queued + int(FAST.max_age * 1000)


async def test_retry_after_capped_by_max_age_then_killed_on_the_next_failure(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    rx.down(503, retry_after="30")
    queued = now_ms()
    item_id = await add(stores, "$e1", now=queued)
    settings = DeliverySettings(**{**FAST.__dict__, "max_age": 1.0, "max_attempts": 50})
    await make_outbox(webhook_network(rx.url), settings=settings)

    async def retried() -> bool:
        return (await get(stores, item_id)).last_error is not None

    await wait_until(retried, what="the first failure")
    first = await get(stores, item_id)
    if first.state == PENDING:
        assert first.next_attempt_at == queued + 1000  # not 30 s away: the deadline

    async def dead() -> bool:
        return (await get(stores, item_id)).state == DEAD

    await wait_until(dead, timeout=5, what="the item to die at its max age")
    item = await get(stores, item_id)
    assert item.attempts == 2
    assert item.last_error is not None
    assert item.last_error.startswith("gave up after 2 attempt(s); last: HTTP 503")
    assert item.finished_at is not None and item.finished_at >= queued + 1000


async def test_an_item_past_max_age_dies_on_its_next_failure(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    rx.down(503)
    item_id = await add(stores, "$old", now=now_ms() - 10_000)
    settings = DeliverySettings(**{**FAST.__dict__, "max_age": 5, "max_attempts": 50})
    await make_outbox(webhook_network(rx.url), settings=settings)

    async def dead() -> bool:
        return (await get(stores, item_id)).state == DEAD

    await wait_until(dead, what="the old item to die")
    assert (await get(stores, item_id)).attempts == 1
    assert len([d for d in rx.attempts if d.idempotency_key == "$old"]) == 1


async def test_an_old_item_is_still_delivered_if_the_receiver_takes_it(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    item_id = await add(stores, "$old", now=now_ms() - 10_000)
    settings = DeliverySettings(**{**FAST.__dict__, "max_age": 5})
    await make_outbox(webhook_network(rx.url), settings=settings)
    await rx.wait_accepted(1, timeout=10)

    async def delivered() -> bool:
        return (await get(stores, item_id)).state == DELIVERED

    await wait_until(delivered, what="delivery")


async def test_a_lane_waiting_on_its_head_does_not_busy_loop(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    rx.down(503, retry_after="30")
    now = now_ms()
    head = await add(stores, "a1", now=now)
    await add(stores, "a2", now=now)  # due long ago, but behind a head that waits 30 s
    calls = 0
    due_heads = stores.outbox.due_heads

    async def counting(*args: Any) -> list[OutboxItem]:
        nonlocal calls
        calls += 1
        return await due_heads(*args)

    stores.outbox.due_heads = counting  # type: ignore[method-assign]
    await make_outbox(webhook_network(rx.url))

    async def retried() -> bool:  # a lease already counts the attempt; wait for its outcome
        return (await get(stores, head)).last_error is not None

    await wait_until(retried, what="the head's first failure")
    calls = 0
    await asyncio.sleep(0.5)
    # Nothing can go out for 30 s: a look per POLL_S (1 s) is plenty, not one every 10 ms.
    assert calls <= 3, f"the delivery loop looked for work {calls} times in 0.5 s"
    assert len(rx.attempts) == 1


async def test_the_delivery_loop_rests_while_every_slot_is_busy(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    rx.stall()  # the platform never answers: the one slot stays busy
    now = now_ms()
    await add(stores, "a1", remote_id=A, now=now)
    await add(stores, "b1", remote_id=B, now=now)  # waits for the slot
    settings = DeliverySettings(**{**FAST.__dict__, "concurrency": 1})
    box = await make_outbox(webhook_network(rx.url), settings=settings)
    rounds = 0
    dispatch = box.deliverer._dispatch

    async def counting() -> None:
        nonlocal rounds
        rounds += 1
        await dispatch()

    box.deliverer._dispatch = counting  # type: ignore[method-assign]
    await rx.wait_attempts(1, timeout=10)
    await asyncio.sleep(1.2)  # past the loop's next planned look at the database
    rounds = 0
    await asyncio.sleep(0.5)
    # Nothing can start until the slot frees (which wakes the loop): a round per POLL_S.
    assert rounds <= 3, f"the delivery loop went round {rounds} times in 0.5 s"
    assert len(rx.attempts) == 1


async def test_delivered_items_that_cannot_be_marked_so_are_tried_again_after_a_rest(
    stores: Stores, rx: WebhookReceiver, make_outbox: Callable[..., Awaitable[Outbox]],
    caplog: pytest.LogCaptureFixture
) -> None:
    tries = 0
    delivered_all = stores.outbox.delivered_all

    async def failing(*args: Any) -> set[int]:  # the database is down
        nonlocal tries
        tries += 1
        raise ConnectionRefusedError("the database is down")

    stores.outbox.delivered_all = failing  # type: ignore[method-assign]
    item_id = await add(stores, "a1", now=now_ms())
    await make_outbox(webhook_network(rx.url))
    await rx.wait_accepted(1, timeout=10)

    async def tried() -> bool:
        return tries > 0

    await wait_until(tried, what="a first try to mark the item delivered")
    await asyncio.sleep(0.5)
    assert tries <= 3, f"the delivered mark was tried {tries} times in 0.5 s"
    failures = [r for r in caplog.records if "delivered item(s)" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None  # one traceback, not one a try
    stores.outbox.delivered_all = delivered_all  # type: ignore[method-assign]

    async def delivered() -> bool:
        return (await get(stores, item_id)).state == DELIVERED

    await wait_until(delivered, what="the item to be marked delivered once the database is back")
    assert len(rx.attempts) == 1


async def test_a_stop_cancelling_a_lease_that_then_fails_is_not_swallowed() -> None:
    """The delivery loop logs a failure and goes on: a cancellation must reach it as one."""
    started = asyncio.Event()

    async def failing_lease() -> list[OutboxItem]:
        started.set()
        await asyncio.sleep(0.05)
        raise ConnectionRefusedError("the database is down")

    task = asyncio.create_task(finish(failing_lease()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- pull -----------------------------------------------------------------------------------


async def test_pull_long_poll_returns_when_woken(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbox_module, "POLL_S", 30.0)  # only a wake can end the wait early
    network = pull_network()
    box = await make_outbox(network, start=False)
    task = asyncio.create_task(box.pull(network, 0, 8, 10))
    await asyncio.sleep(0.2)
    assert not task.done()
    item_id = await add(stores, "x1", network="chat", now=now_ms())
    box.wake({"sms"})  # another network's news does not end this wait
    await asyncio.sleep(0.2)
    assert not task.done()
    started = time.monotonic()
    box.wake({"chat"})
    items = await asyncio.wait_for(task, 2)
    assert time.monotonic() - started < 1.0
    assert ids(items) == [item_id]
    assert items[0].event()["id"] == item_id
    assert await pulled_at(stores, item_id) is not None


async def test_pull_returns_at_once_when_items_are_waiting(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    network = pull_network()
    box = await make_outbox(network, start=False)
    x1 = await add(stores, "x1", network="chat", now=now_ms())
    x2 = await add(stores, "x2", network="chat", now=now_ms())
    started = time.monotonic()
    assert ids(await box.pull(network, 0, 5, 1)) == [x1]
    assert ids(await box.pull(network, x1, 5, 10)) == [x2]
    assert time.monotonic() - started < 1.0
    assert await box.ack(network, [x1, x2]) == 2
    assert await box.pull(network, 0, 0, 10) == []


async def test_pull_returns_nothing_after_the_wait(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    network = pull_network()
    box = await make_outbox(network, start=False)
    started = time.monotonic()
    assert await box.pull(network, 0, 0.3, 10) == []
    assert 0.25 <= time.monotonic() - started < 1.5
    started = time.monotonic()
    assert await box.pull(network, 0, -5, 10) == []
    assert time.monotonic() - started < 0.5


async def test_pull_wait_is_capped_by_pull_max_wait(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    network = pull_network()
    settings = DeliverySettings(**{**FAST.__dict__, "pull_max_wait": 0.3})
    box = await make_outbox(network, settings=settings, start=False)
    started = time.monotonic()
    assert await box.pull(network, 0, 60, 10) == []
    assert time.monotonic() - started < 1.5


async def test_pull_on_a_webhook_network_is_refused(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    network = webhook_network("http://127.0.0.1:9/hook")
    box = await make_outbox(network, pull_network(), start=False)
    s1 = await add(stores, "s1", network="sms", now=now_ms())
    with pytest.raises(InvalidParam, match="webhook"):
        await box.pull(network, 0, 0, 10)
    assert await pulled_at(stores, s1) is None


async def test_unacknowledged_pull_items_die_at_max_age(
    stores: Stores, make_outbox: Callable[..., Awaitable[Outbox]]
) -> None:
    network = pull_network()
    old = await add(stores, "old", network="chat", now=now_ms() - 10_000)
    fresh = await add(stores, "fresh", network="chat", now=now_ms())
    settings = DeliverySettings(**{**FAST.__dict__, "max_age": 5})
    await make_outbox(network, settings=settings)  # the loop sweeps pull networks at once

    async def dead() -> bool:
        return (await get(stores, old)).state == DEAD

    await wait_until(dead, what="the old pull item to die")
    assert (await get(stores, old)).last_error == "not acknowledged within 5 s"
    assert (await get(stores, fresh)).state == PENDING
    [notice] = [i for i in await all_items(stores) if i.type == "delivery.failed"]
    assert (notice.network, notice.state) == ("chat", PENDING)
    assert notice.event()["failed"]["id"] == old
