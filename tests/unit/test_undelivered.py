"""The notices a Matrix user gets about messages that did not reach the platform: what is sent,
once, and how it is corrected; against a fake homeserver that records the sends."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest
from mautrix.errors import make_request_error
from mautrix.types import EventID, RoomID, UserID
from mautrix.util.async_db import Connection

from dmbridge import payloads
from dmbridge.config import DeliverySettings
from dmbridge.db import Stores, now_ms
from dmbridge.db.outbox import DEAD, PENDING, OutboxItem
from dmbridge.db.undelivered import DELIVERED, FAILED, UndeliveredStore
from dmbridge.homeserver import Homeserver
from dmbridge.networks import Networks
from dmbridge.outbox import Outbox
from dmbridge.undelivered import MAX_ATTEMPTS, Undelivered, txn_id
from tests.unit.test_networks import SMS

USER = "@alice:example.org"
ROOM = "!dm:example.org"
GHOST = SMS.ghost_user_id("+15550001")


class FakeHomeserver:
    """Records every send; answers with an event ID, or raises what it is told to."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.fail: Exception | None = None

    async def send_event(self, ghost_id: UserID, room_id: RoomID, event_type: str, txn: str,
                         content: dict[str, Any], attempts: int = 3) -> EventID:
        await asyncio.sleep(0)  # a real send lets other tasks run
        if self.fail is not None:
            raise self.fail
        self.sent.append({"ghost_id": ghost_id, "room_id": room_id, "type": event_type,
                          "txn": txn, "content": content})
        return EventID(f"$notice{len(self.sent)}")


def _undelivered(stores: Stores, hs: FakeHomeserver) -> Undelivered:
    told = Undelivered(stores=stores, networks=Networks([SMS]))
    told._homeserver = cast(Homeserver, hs)  # what start() hands it, without the loop
    return told


async def _item(stores: Stores, event_id: str, type_: str = payloads.MESSAGE) -> OutboxItem:
    lane = payloads.Lane("sms", "+15550001", USER, GHOST)
    payload = lane.envelope(type_, event_id, ROOM, now_ms())
    item_id = await stores.outbox.add_now(network="sms", remote_id="+15550001", user_id=USER,
                                          type=type_, key=event_id, payload=payload,
                                          now=now_ms() - 1000)
    assert item_id is not None
    item = await stores.outbox.get(item_id)
    assert item is not None
    return item


async def _dead(stores: Stores, item: OutboxItem) -> OutboxItem:
    assert await stores.outbox.kill(item.id, 3, "HTTP 503", now_ms())
    dead = await stores.outbox.get(item.id)
    assert dead is not None
    return dead


async def _requeued(stores: Stores, item: OutboxItem) -> OutboxItem:
    assert await stores.outbox.requeue("sms", [item.id], now_ms()) == [item.id]
    again = await stores.outbox.get(item.id)
    assert again is not None and again.queued_at != again.created_at
    return again


async def _dead_letter(told: Undelivered, item: OutboxItem) -> bool:
    """What the outbox does as ``item`` becomes a dead letter."""
    async with told.stores.db.acquire() as conn, conn.transaction():
        return await told.dead_letter(conn, item)


async def _delivered(told: Undelivered, item: OutboxItem) -> bool:
    async with told.stores.db.acquire() as conn, conn.transaction():
        return await told.delivered(conn, item)


async def _acknowledged(told: Undelivered, network: str, ids: list[int]) -> bool:
    async with told.stores.db.acquire() as conn, conn.transaction():
        return await told.acknowledged(conn, network, ids)


async def test_a_dead_letter_is_told_once_in_reply_from_the_ghost(stores: Stores) -> None:
    hs = FakeHomeserver()
    told = _undelivered(stores, hs)
    item = await _dead(stores, await _item(stores, "$lost"))
    await _dead_letter(told, item)
    await _dead_letter(told, item)  # dead again after a retry: still one notice
    assert await told.send_due() == 1
    assert await told.send_due() == 0
    [sent] = hs.sent
    assert (sent["ghost_id"], sent["room_id"], sent["type"]) == (GHOST, ROOM, "m.room.message")
    assert sent["content"] == {
        "msgtype": "m.notice",
        "body": "\N{WARNING SIGN}\N{VARIATION SELECTOR-16} Not delivered: SMS did not accept"
                " this message. The bridge's administrator can send it again; you will see"
                " here if it gets through.",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$lost"}},
    }
    row = await stores.undelivered.get("$lost")
    assert row is not None and sent["txn"] == txn_id(FAILED, row)
    assert (row.told, row.shown, row.notice_event_id) == (FAILED, FAILED, "$notice1")


async def test_only_the_users_own_messages_are_told(stores: Stores) -> None:
    hs = FakeHomeserver()
    told = _undelivered(stores, hs)
    for type_ in (payloads.DELIVERY_FAILED, payloads.REACTION, payloads.TYPING):
        item = await _dead(stores, await _item(stores, f"$x-{type_}", type_))
        await _dead_letter(told, item)
    edit = await _dead(stores, await _item(stores, "$edit", payloads.EDIT))
    await _dead_letter(told, edit)
    assert await told.send_due() == 1
    assert [s["content"]["m.relates_to"] for s in hs.sent] == [
        {"m.in_reply_to": {"event_id": "$edit"}}]


async def test_a_retry_delivered_edits_the_notice(stores: Stores) -> None:
    hs = FakeHomeserver()
    told = _undelivered(stores, hs)
    item = await _dead(stores, await _item(stores, "$late"))
    await _dead_letter(told, item)
    await told.send_due()
    await _delivered(told, await _requeued(stores, item))
    assert await told.send_due() == 1
    first, edit = hs.sent
    text = ("\N{WHITE HEAVY CHECK MARK} Delivered after all: SMS accepted this message on a"
            " later attempt.")
    assert edit["content"] == {
        "msgtype": "m.notice", "body": f"* {text}",
        "m.new_content": {"msgtype": "m.notice", "body": text},
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$notice1"},
    }
    assert edit["txn"] != first["txn"]
    row = await stores.undelivered.get("$late")
    assert row is not None and (row.told, row.shown) == (DELIVERED, DELIVERED)


async def test_a_retry_delivered_before_the_notice_went_out_sends_nothing(
        stores: Stores) -> None:
    hs = FakeHomeserver()
    told = _undelivered(stores, hs)
    item = await _dead(stores, await _item(stores, "$quick"))
    await _dead_letter(told, item)
    await _delivered(told, await _requeued(stores, item))
    assert await told.send_due() == 1
    assert hs.sent == []
    assert await told.send_due() == 0


async def test_an_item_delivered_at_its_first_try_costs_no_database_work(
        stores: Stores) -> None:
    told = _undelivered(stores, FakeHomeserver())
    item = await _item(stores, "$fine")

    class NoDatabase:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the database was used: {name}")

    told.stores = cast(Stores, NoDatabase())
    assert not told.may_correct(item)
    assert not await told.delivered(cast(Connection, NoDatabase()), item)


async def test_an_acknowledged_retry_on_a_pull_network_edits_the_notice(stores: Stores) -> None:
    hs = FakeHomeserver()
    told = _undelivered(stores, hs)
    item = await _dead(stores, await _item(stores, "$pulled"))
    await _dead_letter(told, item)
    await told.send_due()
    await _requeued(stores, item)
    assert await stores.outbox.ack("sms", [item.id], now_ms()) == 1
    await _acknowledged(told, "sms", [item.id])
    assert await told.send_due() == 1
    assert hs.sent[-1]["content"]["m.relates_to"] == {"rel_type": "m.replace",
                                                      "event_id": "$notice1"}


async def test_a_refused_notice_is_given_up_and_logged(
        stores: Stores, caplog: pytest.LogCaptureFixture) -> None:
    hs = FakeHomeserver()
    hs.fail = make_request_error(403, "{}", "M_FORBIDDEN", "not in the room")
    told = _undelivered(stores, hs)
    await _dead_letter(told, await _dead(stores, await _item(stores, "$gone")))
    caplog.set_level(logging.WARNING, "dmbridge.undelivered")
    assert await told.send_due() == 0
    hs.fail = None
    assert await told.send_due() == 0  # not tried again
    assert hs.sent == []
    assert any("could not tell" in r.getMessage() and "given up" in r.getMessage()
               for r in caplog.records)


async def test_a_notice_that_cannot_be_sent_is_tried_again_then_given_up(
        stores: Stores) -> None:
    hs = FakeHomeserver()
    hs.fail = make_request_error(502, "{}", None, None)
    told = _undelivered(stores, hs)
    await _dead_letter(told, await _dead(stores, await _item(stores, "$later")))
    assert await told.send_due() == 0
    assert await stores.undelivered.due(now_ms(), 10) == []  # waits before the next try
    for _ in range(MAX_ATTEMPTS - 1):
        assert [n.event_id for n in await stores.undelivered.due(now_ms() + 10**9, 10)] == [
            "$later"]
        await stores.db.execute("UPDATE undelivered_notice SET lease_until=NULL, due_at=0")
        assert await told.send_due() == 0
    assert await stores.undelivered.due(now_ms() + 10**9, 10) == []  # given up
    row = await stores.undelivered.get("$later")
    assert row is not None and row.shown == FAILED and row.notice_event_id is None


async def test_two_workers_send_one_notice(stores: Stores) -> None:
    hs = FakeHomeserver()
    one, other = _undelivered(stores, hs), _undelivered(stores, hs)
    await _dead_letter(one, await _dead(stores, await _item(stores, "$both")))
    await asyncio.gather(one.send_due(), other.send_due())
    assert len(hs.sent) == 1


async def test_looking_for_due_notices_searches_an_index_not_the_settled_rows(
        stores: Stores) -> None:
    """Settled notices are kept for days: finding the few still due never reads them all."""
    from mautrix.util.async_db import Database

    from tests.unit.test_dm_query_plans import Planned

    planned = Planned(stores.db)
    await UndeliveredStore(cast(Database, planned)).due(now_ms(), 50)
    [plan] = planned.plans.values()
    text = "\n".join(plan)
    assert "undelivered_notice_due" in text, text
    assert "SCAN undelivered_notice" not in text and "Seq Scan" not in text, text


def _outbox(stores: Stores) -> Outbox:
    settings = DeliverySettings(max_attempts=3, max_age=60, initial_backoff=0.02,
                                max_backoff=0.05, timeout=3, concurrency=4,
                                pull_ack_timeout=30, pull_max_wait=10)
    return Outbox(stores=stores, networks=Networks([SMS]), settings=settings)


async def test_a_dead_letter_and_its_notice_are_recorded_together(
        stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """The notice cannot be recorded (the database fails at that moment): the item is not a
    dead letter either, so its next failure kills it again and the user is told then."""
    box = _outbox(stores)
    item = await _item(stores, "$crash")
    real = UndeliveredStore.add

    async def failing(*args: Any) -> bool:
        raise OSError("connection lost")

    monkeypatch.setattr(UndeliveredStore, "add", staticmethod(failing))
    with pytest.raises(OSError):
        await box.dead_letter(item, 3, "HTTP 503")
    assert (await stores.outbox.get(item.id)).state == PENDING  # type: ignore[union-attr]
    assert await stores.undelivered.get("$crash") is None

    monkeypatch.setattr(UndeliveredStore, "add", staticmethod(real))
    await box.dead_letter(item, 3, "HTTP 503")
    assert (await stores.outbox.get(item.id)).state == DEAD  # type: ignore[union-attr]
    row = await stores.undelivered.get("$crash")
    assert row is not None and row.told == FAILED


async def test_a_delivery_and_the_correction_of_its_notice_are_recorded_together(
        stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    box = _outbox(stores)
    item = await _dead(stores, await _item(stores, "$back"))
    await _dead_letter(box.undelivered, item)
    again = await _requeued(stores, item)

    async def failing(*args: Any) -> int:
        raise OSError("connection lost")

    now = now_ms()
    assert await stores.outbox.lease(again.id, now, now + 60_000, "held")
    real = UndeliveredStore.delivered
    monkeypatch.setattr(UndeliveredStore, "delivered", staticmethod(failing))
    with pytest.raises(OSError):
        await box.deliverer.delivered([(again.id, "held")], [again])
    # Not recorded as delivered: its lease runs out and it is delivered (and corrected) again.
    assert (await stores.outbox.get(item.id)).state == PENDING  # type: ignore[union-attr]

    monkeypatch.setattr(UndeliveredStore, "delivered", staticmethod(real))
    assert await box.deliverer.delivered([(again.id, "held")], [again]) == {again.id}
    row = await stores.undelivered.get("$back")
    assert row is not None and row.told == DELIVERED


async def test_a_retry_delivered_after_the_failure_notice_was_given_up_says_nothing(
        stores: Stores) -> None:
    """The user never saw the failure (its notice was given up): a later delivery does not
    send an unexplained 'delivered after all'."""
    hs = FakeHomeserver()
    hs.fail = make_request_error(403, "{}", "M_FORBIDDEN", "not in the room")
    told = _undelivered(stores, hs)
    item = await _dead(stores, await _item(stores, "$unseen"))
    await _dead_letter(told, item)
    assert await told.send_due() == 0  # given up
    hs.fail = None
    await _delivered(told, await _requeued(stores, item))
    await told.send_due()
    assert hs.sent == []
    row = await stores.undelivered.get("$unseen")
    assert row is not None and (row.told, row.shown) == (DELIVERED, DELIVERED)


class HeldHomeserver(FakeHomeserver):
    """Holds every send until released, as the rate limits may."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def send_event(self, ghost_id: UserID, room_id: RoomID, event_type: str, txn: str,
                         content: dict[str, Any], attempts: int = 3) -> EventID:
        self.started.set()
        await self.release.wait()
        return await super().send_event(ghost_id, room_id, event_type, txn, content, attempts)


async def test_a_notice_is_held_for_as_long_as_its_send_may_wait_out_the_rate_limits(
        stores: Stores) -> None:
    """rate_limits.background_wait at its largest: while one worker's send waits, no other
    worker sends the notice, however long the wait lasts."""
    hs = HeldHomeserver()
    one = Undelivered(stores=stores, networks=Networks([SMS]), background_wait=240)
    other = Undelivered(stores=stores, networks=Networks([SMS]), background_wait=240)
    one._homeserver = other._homeserver = cast(Homeserver, hs)
    await _dead_letter(one, await _dead(stores, await _item(stores, "$held")))
    sending = asyncio.create_task(one.send_due())
    await hs.started.wait()
    waited = now_ms() + (240 + 60) * 1000  # the wait and the request at their longest
    assert await stores.undelivered.due(waited, 10) == []
    notice = await stores.undelivered.get("$held")
    assert notice is not None
    assert not await stores.undelivered.lease(notice, waited, waited + 1000)
    hs.release.set()
    assert await sending == 1
    assert await other.send_due() == 0
    assert len(hs.sent) == 1


async def test_a_send_that_outlasts_its_lease_is_abandoned_and_tried_again(
        stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dmbridge.undelivered.SEND_TIMEOUT_S", 0.05)
    hs = HeldHomeserver()  # never released
    told = Undelivered(stores=stores, networks=Networks([SMS]), background_wait=0)
    told._homeserver = cast(Homeserver, hs)
    await _dead_letter(told, await _dead(stores, await _item(stores, "$stuck")))
    assert await told.send_due() == 0
    row = await stores.undelivered.get("$stuck")
    assert row is not None and row.shown is None and row.attempts == 1
    assert [n.event_id for n in await stores.undelivered.due(now_ms() + 10**9, 10)] == [
        "$stuck"]


async def test_a_notice_failing_unexpectedly_spares_the_others_and_is_given_up_in_the_end(
        stores: Stores) -> None:
    class Broken(FakeHomeserver):
        async def send_event(self, ghost_id: UserID, room_id: RoomID, event_type: str,
                             txn: str, content: dict[str, Any], attempts: int = 3) -> EventID:
            if content["m.relates_to"]["m.in_reply_to"]["event_id"] == "$broken":
                raise KeyError("event_id")  # a malformed answer
            return await super().send_event(ghost_id, room_id, event_type, txn, content)

    hs = Broken()
    told = _undelivered(stores, hs)
    await _dead_letter(told, await _dead(stores, await _item(stores, "$broken")))
    await _dead_letter(told, await _dead(stores, await _item(stores, "$fine")))
    assert await told.send_due() == 1
    assert [s["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] for s in hs.sent] == [
        "$fine"]
    for _ in range(MAX_ATTEMPTS - 1):
        await stores.db.execute("UPDATE undelivered_notice SET lease_until=NULL, due_at=0"
                                " WHERE event_id='$broken'")
        assert await told.send_due() == 0
    assert await stores.undelivered.due(now_ms() + 10**9, 10) == []  # given up
    row = await stores.undelivered.get("$broken")
    assert row is not None and row.shown == FAILED and row.notice_event_id is None
