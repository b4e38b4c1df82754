"""A Matrix user replies: what the platform receives, by webhook or by pull, through failures."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from nio import ProfileSetDisplayNameResponse

from dmbridge.bridge import Bridge
from tests.integration.conftest import (
    BridgeFactory,
    Homeserver,
    NewHuman,
    Platform,
    accept_dm,
    wait_for,
)
from tests.support.matrix import Human
from tests.support.process import BridgeProcess
from tests.support.settings import CHAT_TOKEN, HS_TOKEN, SMS_TOKEN
from tests.support.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Delivery,
    WebhookReceiver,
    verify_signature,
)

SECRET = "webhook-secret-0123456789abcdef"
NAME = "Bob Example"  # the human's display name, set before joining so the room knows it
# Retries come quickly; a stuck receiver is given up on quickly.
FAST: dict[str, Any] = {"delivery.initial_backoff": 0.2, "delivery.max_backoff": 1,
                        "delivery.timeout": 3}


def _phone() -> str:
    return "+1555" + str(uuid.uuid4().int)[:7]


def _webhook(rx: WebhookReceiver) -> dict[str, dict[str, Any]]:
    return {"sms": {"delivery": {"mode": "webhook", "url": rx.url, "secret": SECRET}}}


async def _joined_dm(platform: Platform, human: Human, phone: str,
                     bridge: Bridge | None = None) -> str:
    """The platform writes first and the human accepts; the DM's room ID.

    With an in-process ``bridge``, returns once it has recorded the join. A bridge process is
    not asked: the homeserver sends it the join before anything the human says afterwards.
    """
    named = await human.client.set_displayname(NAME)
    assert isinstance(named, ProfileSetDisplayNameResponse), named
    status, first = await platform.send("sms", SMS_TOKEN, f"m-{uuid.uuid4().hex[:8]}",
                                        sender=phone, recipient=human.user_id, text="Hi, Bob?")
    assert status == 200, first
    room_id: str = first["room_id"]
    await accept_dm(human, room_id, bridge)
    return room_id


def _keys(deliveries: list[Delivery]) -> list[str | None]:
    return [d.idempotency_key for d in deliveries]


async def _pull(platform: Platform, *, after: int | None = None, wait: float = 0
                ) -> tuple[int, Any]:
    params = {"wait": str(wait)} | ({"after": str(after)} if after is not None else {})
    return await platform.call("GET", "/networks/sms/events", SMS_TOKEN, params=params)


async def _dead_letters(platform: Platform) -> list[dict[str, Any]]:
    status, body = await platform.call("GET", "/networks/sms/dead-letters", SMS_TOKEN)
    assert status == 200, body
    letters: list[dict[str, Any]] = body["dead_letters"]
    return letters


async def _retry(platform: Platform, body: Any = None, data: bytes | None = None
                 ) -> tuple[int, Any]:
    return await platform.call("POST", "/networks/sms/dead-letters/retry", SMS_TOKEN,
                               json=body, data=data)


# --- webhook ------------------------------------------------------------------------------------


async def test_reply_reaches_the_webhook_signed_with_sender_recipient_and_text(
    start_bridge: BridgeFactory, platform: Platform, new_human: NewHuman
) -> None:
    """The platform's webhook gets each reply, signed, with who wrote it, to whom, and what."""
    async with WebhookReceiver(SECRET) as rx:
        bridge = await start_bridge(networks=_webhook(rx), **FAST)
        human, phone = await new_human(), _phone()
        room_id = await _joined_dm(platform, human, phone, bridge)

        rich = await human.say(room_id, "See you at *8*", html="See you at <em>8</em>")
        plain = await human.say(room_id, "bring snacks")
        first, second = await rx.wait_accepted(2)

    assert _keys(rx.accepted) == [rich, plain], rx.summary()
    assert first.signature_ok and second.signature_ok, rx.summary()
    stamp, signature = first.headers[TIMESTAMP_HEADER], first.headers[SIGNATURE_HEADER]
    assert not verify_signature("some-other-secret-0123", stamp, signature, first.body)
    assert first.headers["X-Dmbridge-Attempt"] == "1"

    payload = first.json
    assert first.headers["X-Dmbridge-Delivery"] == str(payload["id"])
    [sent] = [m for m in await human.messages(room_id) if m["event_id"] == rich]
    assert {k: v for k, v in payload.items() if k not in ("id", "queued_at", "message")} == {
        "type": "message",
        "idempotency_key": rich,
        "network": "sms",
        "remote_id": phone,
        "ghost_id": f"@dm_sms_=2b{phone[1:]}:localhost",
        "user_id": human.user_id,
        "room_id": room_id,
    }
    assert payload["message"] == {
        "event_id": rich,
        "sender": {"user_id": human.user_id, "displayname": NAME},
        "recipient": phone,
        "msgtype": "m.text",
        "text": "See you at *8*",
        "html": "See you at <em>8</em>",
        "media": None,
        "reply_to": None,
        "thread_root": None,
        "sent_at": sent["origin_server_ts"],
    }
    assert second.json["message"]["text"] == "bring snacks"
    assert second.json["message"]["html"] is None
    assert second.json["id"] > payload["id"]


async def test_replies_wait_for_a_receiver_that_is_down_and_arrive_in_order_once(
    start_bridge: BridgeFactory, platform: Platform, new_human: NewHuman
) -> None:
    """While the webhook fails, replies wait; once it is back, each arrives once, in order."""
    async with WebhookReceiver(SECRET) as rx:
        bridge = await start_bridge(networks=_webhook(rx), **FAST)
        human, phone = await new_human(), _phone()
        room_id = await _joined_dm(platform, human, phone, bridge)

        rx.down(503)
        texts = ["one", "two", "three"]
        sent = [await human.say(room_id, text) for text in texts]
        failed = await rx.wait_attempts(3)
        rx.up()
        accepted = await rx.wait_accepted(3)

    # The first reply holds up the others until it is through.
    assert set(_keys(failed)) == {sent[0]}, rx.summary()
    assert all(d.status == 503 for d in failed)
    assert _keys(accepted) == sent, rx.summary()
    assert [d.json["message"]["text"] for d in accepted] == texts
    assert all(d.signature_ok for d in rx.attempts), rx.summary()
    tries = [d for d in rx.attempts if d.idempotency_key == sent[0]]
    assert accepted[0].headers["X-Dmbridge-Attempt"] == str(len(tries)), rx.summary()
    assert {d.headers["X-Dmbridge-Delivery"] for d in tries} == {str(accepted[0].json["id"])}


async def test_retry_after_from_the_receiver_spaces_the_attempts(
    start_bridge: BridgeFactory, platform: Platform, new_human: NewHuman
) -> None:
    """A receiver answering 503 with Retry-After: 2 is not asked again for two seconds."""
    async with WebhookReceiver(SECRET) as rx:
        bridge = await start_bridge(networks=_webhook(rx), **FAST)
        human, phone = await new_human(), _phone()
        room_id = await _joined_dm(platform, human, phone, bridge)

        rx.down(503, retry_after="2")
        reply = await human.say(room_id, "later is fine")
        [refused] = await rx.wait_attempts(1)
        rx.up()
        [delivered] = await rx.wait_accepted(1)

    assert _keys(rx.attempts) == [reply, reply], rx.summary()
    assert refused.status == 503 and delivered.headers["X-Dmbridge-Attempt"] == "2"
    # Without the header the retry would come after 0.1-0.2 s (initial_backoff, jittered).
    assert delivered.received_at - refused.received_at >= 1.8, rx.summary()


async def test_dead_letters_are_listed_and_delivered_when_retried(
    start_bridge: BridgeFactory, platform: Platform, new_human: NewHuman
) -> None:
    """A reply the webhook never took is a dead letter; retried, it arrives, as does the notice."""
    async with WebhookReceiver(SECRET) as rx:
        bridge = await start_bridge(networks=_webhook(rx), **FAST, **{"delivery.max_attempts": 3})
        human, phone = await new_human(), _phone()
        room_id = await _joined_dm(platform, human, phone, bridge)

        rx.down(503)
        lost = await human.say(room_id, "are you getting these?")

        # The reply dies after 3 attempts; the notice saying so dies too, the receiver being down.
        async def both_dead() -> bool:
            return len(await _dead_letters(platform)) >= 2

        await wait_for(both_dead, what="the reply and its delivery.failed notice to be dead")
        message, notice = await _dead_letters(platform)
        assert _keys(rx.attempts).count(lost) == 3, rx.summary()
        assert message["type"] == "message" and message["idempotency_key"] == lost
        assert (message["remote_id"], message["user_id"]) == (phone, human.user_id)
        assert message["attempts"] == 3 and message["failed_at"] >= message["created_at"]
        assert "HTTP 503" in message["error"], message
        assert message["event"]["message"]["text"] == "are you getting these?"
        assert notice["type"] == "delivery.failed"
        assert notice["event"]["failed"]["idempotency_key"] == lost

        rx.up()
        assert await _retry(platform, {"ids": [message["id"]]}) == (
            200, {"requeued": [message["id"]]})
        [delivered] = await rx.wait_accepted(1)
        assert delivered.idempotency_key == lost and delivered.signature_ok
        assert delivered.json["message"]["text"] == "are you getting these?"
        assert delivered.headers["X-Dmbridge-Attempt"] == "1"  # a fresh start
        assert [d["id"] for d in await _dead_letters(platform)] == [notice["id"]]

        assert await _retry(platform, {"all": True}) == (200, {"requeued": [notice["id"]]})
        [_, told] = await rx.wait_accepted(2)
        assert told.json["type"] == "delivery.failed" and told.signature_ok
        assert told.json["failed"] == {"id": message["id"], "type": "message",
                                       "idempotency_key": lost, "attempts": 3,
                                       "error": message["error"]}
        assert await _dead_letters(platform) == []

        # Nothing to retry: unknown or no longer dead.
        assert await _retry(platform, {"ids": [message["id"], 999_999]}) == (
            200, {"requeued": []})
        status, err = await _retry(platform, {"ids": "all"})
        assert (status, err["errcode"]) == (400, "M_BAD_JSON")
        status, err = await _retry(platform, data=b"ids=1")
        assert (status, err["errcode"]) == (400, "M_NOT_JSON")
    assert _keys(rx.accepted) == [lost, told.idempotency_key], rx.summary()


async def test_retry_and_ack_refuse_ids_beyond_any_outbox_id(
    bridge: Bridge, platform: Platform
) -> None:
    """An id no outbox item can have is a bad request, not an internal error."""
    for path in ("/networks/sms/dead-letters/retry", "/networks/sms/events/ack"):
        status, err = await platform.call("POST", path, SMS_TOKEN, json={"ids": [2**63]})
        assert (status, err["errcode"]) == (400, "M_BAD_JSON"), (path, err)


async def test_resent_transaction_delivers_each_reply_once(
    start_bridge: BridgeFactory, platform: Platform, new_human: NewHuman,
    homeserver: Homeserver,
) -> None:
    """When the homeserver sends a transaction again, under any ID, no reply goes out twice."""
    async with WebhookReceiver(SECRET) as rx:
        bridge = await start_bridge(networks=_webhook(rx), **FAST)
        human, phone = await new_human(), _phone()
        room_id = await _joined_dm(platform, human, phone, bridge)

        real = await human.say(room_id, "through the homeserver")
        await rx.wait_accepted(1)
        [seen] = [m for m in await human.messages(room_id) if m["event_id"] == real]
        crafted = {"type": "m.room.message", "event_id": f"$resent-{uuid.uuid4().hex}",
                   "room_id": room_id, "sender": human.user_id,
                   "origin_server_ts": int(time.time() * 1000),
                   "content": {"msgtype": "m.text", "body": "sent twice"}}
        events = [{**seen, "room_id": room_id}, crafted]
        # The homeserver restarted in between and counts transaction IDs from 1 again.
        for txn_id in ("1001", "1"):
            assert await _put_transaction(homeserver, txn_id, events) == (200, {})

        # Replies of one DM go out in order: a duplicate would arrive before this one.
        last = await human.say(room_id, "the last word")
        accepted = await rx.wait_accepted(3)

    assert _keys(accepted) == [real, crafted["event_id"], last], rx.summary()
    assert [d.json["message"]["text"] for d in accepted] == [
        "through the homeserver", "sent twice", "the last word"]


async def _put_transaction(homeserver: Homeserver, txn_id: str, events: list[dict[str, Any]]
                           ) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{homeserver.bridge_port}/_matrix/app/v1/transactions/{txn_id}"
    headers = {"Authorization": f"Bearer {HS_TOKEN}"}
    async with aiohttp.ClientSession() as s, s.put(url, json={"events": events},
                                                   headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


# --- pull ---------------------------------------------------------------------------------------


async def test_pull_waits_for_a_reply_and_hands_out_unacknowledged_ones_again(
    start_bridge: BridgeFactory, platform: Platform, new_human: NewHuman
) -> None:
    """A polling platform gets the reply as it is sent; what it does not acknowledge comes again."""
    chat_webhook = {"mode": "webhook", "url": "http://127.0.0.1:9/unused", "secret": SECRET}
    bridge = await start_bridge(
        networks={"sms": {"delivery": {"mode": "pull"}}, "chat": {"delivery": chat_webhook}},
        **{"delivery.pull_ack_timeout": 2},
    )
    human, phone = await new_human(), _phone()
    room_id = await _joined_dm(platform, human, phone, bridge)

    poll = asyncio.create_task(_pull(platform, wait=10))
    # A long-poll that works never answers early; one that answers at once is caught here.
    done, _ = await asyncio.wait({poll}, timeout=0.5)
    assert not done, f"the long-poll answered with nothing to hand out: {poll.result()}"
    first = await human.say(room_id, "pulled")
    status, got = await poll
    assert status == 200, got
    [event] = got["events"]
    assert got["next_after"] == event["id"]
    assert event["type"] == "message" and event["idempotency_key"] == first
    assert (event["network"], event["remote_id"], event["user_id"], event["room_id"]) == (
        "sms", phone, human.user_id, room_id)
    assert event["message"]["text"] == "pulled"
    assert event["message"]["sender"] == {"user_id": human.user_id, "displayname": NAME}

    ack = await platform.call("POST", "/networks/sms/events/ack", SMS_TOKEN,
                              json={"ids": [event["id"]]})
    assert ack == (200, {"acknowledged": 1})
    assert await _pull(platform) == (200, {"events": [], "next_after": 0})

    second = await human.say(room_id, "not acknowledged")
    status, got = await _pull(platform, after=event["id"], wait=10)
    assert status == 200, got
    [unacked] = got["events"]
    assert unacked["idempotency_key"] == second
    cursor = got["next_after"]
    # Past the cursor and fetched only now: not handed out again yet ...
    assert await _pull(platform, after=cursor) == (200, {"events": [], "next_after": cursor})
    # ... but once pull_ack_timeout has passed without an ack, it is.
    status, again = await _pull(platform, after=cursor, wait=10)
    assert status == 200, again
    assert again["events"] == [unacked]

    ack = await platform.call("POST", "/networks/sms/events/ack", SMS_TOKEN,
                              json={"ids": [unacked["id"]]})
    assert ack == (200, {"acknowledged": 1})
    ack = await platform.call("POST", "/networks/sms/events/ack", SMS_TOKEN,
                              json={"ids": [unacked["id"]]})
    assert ack == (200, {"acknowledged": 0})
    assert await _pull(platform) == (200, {"events": [], "next_after": 0})

    status, err = await platform.call("GET", "/networks/chat/events", CHAT_TOKEN)
    assert (status, err["errcode"]) == (400, "M_INVALID_PARAM")
    assert "webhook" in err["error"]


# --- crashes ------------------------------------------------------------------------------------


@asynccontextmanager
async def _bridge_process(homeserver: Homeserver, db_url: str, folder: Path,
                          rx: WebhookReceiver) -> AsyncIterator[BridgeProcess]:
    """A started bridge process on the session's bridge port, stopped at the end.

    A short delivery timeout, so a crashed delivery's lease (timeout + 5 s) runs out soon.
    """
    homeserver.settings(db_url, folder, networks=_webhook(rx),
                        **{**FAST, "delivery.timeout": 1})
    async with BridgeProcess(folder / "config.yaml", folder / "bridge.log") as proc:
        await _start(proc, homeserver)
        yield proc
        await proc.terminate(timeout=15.0)


async def _start(proc: BridgeProcess, homeserver: Homeserver) -> None:
    proc.start()
    await proc.wait_ready(homeserver.bridge_port)


async def _outbox_has(db_url: str, key: str) -> bool:
    """Whether the bridge has committed an outbox item with this key, read from its database."""
    query = "SELECT COUNT(*) FROM outbox WHERE idempotency_key = "
    if db_url.startswith("sqlite:///"):
        def read() -> int:
            with closing(sqlite3.connect(db_url.removeprefix("sqlite:///"))) as db:
                return int(db.execute(query + "?", (key,)).fetchone()[0])

        return await asyncio.to_thread(read) > 0
    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval(query + "$1", key)) > 0
    finally:
        await conn.close()


async def test_reply_in_flight_when_the_bridge_is_killed_arrives_after_restart(
    homeserver: Homeserver, db_url: str, tmp_path: Path, platform: Platform,
    new_human: NewHuman,
) -> None:
    """The bridge dies mid-delivery; once it is back, the reply arrives, under the same key."""
    async with WebhookReceiver(SECRET) as rx, \
            _bridge_process(homeserver, db_url, tmp_path / "proc", rx) as proc:
        human, phone = await new_human(), _phone()
        room_id = await _joined_dm(platform, human, phone)

        rx.stall()
        reply = await human.say(room_id, "sent as the bridge crashed")
        [stalled] = await rx.wait_attempts(1)
        assert await proc.kill() == -9
        rx.up()
        await _start(proc, homeserver)
        [delivered] = await rx.wait_accepted(1)
        assert delivered.idempotency_key == stalled.idempotency_key == reply
        assert delivered.body == stalled.body and delivered.signature_ok

        after = await human.say(room_id, "after the restart")
        accepted = await rx.wait_accepted(2)
    assert _keys(accepted) == [reply, after], rx.summary()


async def test_reply_committed_just_before_a_crash_is_delivered_once_after_restart(
    homeserver: Homeserver, db_url: str, tmp_path: Path, platform: Platform,
    new_human: NewHuman,
) -> None:
    """The bridge dies right after taking a reply in, its receiver offline; it arrives once."""
    async with WebhookReceiver(SECRET) as rx, \
            _bridge_process(homeserver, db_url, tmp_path / "proc", rx) as proc:
        human, phone = await new_human(), _phone()
        room_id = await _joined_dm(platform, human, phone)

        await rx.stop()
        reply = await human.say(room_id, "written before the crash")
        await wait_for(lambda: _outbox_has(db_url, reply), what="the reply to be committed")
        assert await proc.kill() == -9
        await rx.start()
        await _start(proc, homeserver)
        [delivered] = await rx.wait_accepted(1)
        assert delivered.json["message"]["text"] == "written before the crash"

        after = await human.say(room_id, "after the restart")
        accepted = await rx.wait_accepted(2)
    assert _keys(accepted) == [reply, after], rx.summary()
    assert _keys(rx.attempts) == [reply, after], "each reply reached the receiver just once"
