"""The Matrix user is never left in the dark: what their client shows when the bridge cannot
carry something through, and the bridge state of the rooms they start."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nio import RoomCreateResponse, RoomPreset, RoomPutStateResponse

from dmbridge.bridge import Bridge
from dmbridge.db.undelivered import DELIVERED, FAILED
from tests.integration.conftest import (
    BridgeFactory,
    Homeserver,
    NewHuman,
    Platform,
    accept_dm,
    wait_for,
)
from tests.support.feed import Feed
from tests.support.holding_proxy import HoldingProxy
from tests.support.matrix import Human
from tests.support.settings import CHAT_TOKEN, SMS_TOKEN
from tests.support.webhook import WebhookReceiver

SECRET = "webhook-secret-0123456789abcdef"
FAST: dict[str, Any] = {"delivery.initial_backoff": 0.2, "delivery.max_backoff": 1,
                        "delivery.timeout": 3, "delivery.max_attempts": 2}
BRIDGE_TYPES = ("m.bridge", "uk.half-shot.bridge")


def _phone() -> str:
    return "+1555" + str(uuid.uuid4().int)[:7]


def _contact() -> str:
    return f"c{uuid.uuid4().hex[:12]}"


async def _dm_with(platform: Platform, bridge: Bridge, human: Human, network: str, token: str,
                   contact: str) -> str:
    status, body = await platform.send(network, token, uuid.uuid4().hex, sender=contact,
                                       recipient=human.user_id, text="hello")
    assert status == 200, body
    room_id: str = body["room_id"]
    await accept_dm(human, room_id, bridge)
    return room_id


def _replies_to(events: list[dict[str, Any]], event_id: str) -> list[dict[str, Any]]:
    """The events that answer ``event_id`` (an m.in_reply_to), oldest first."""
    return [e for e in events if e["content"].get("m.relates_to", {}).get(
        "m.in_reply_to", {}).get("event_id") == event_id]


def _edits_of(events: list[dict[str, Any]], event_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["content"].get("m.relates_to", {}).get("rel_type") ==
            "m.replace" and e["content"]["m.relates_to"].get("event_id") == event_id]


async def _notice_for(human: Human, room_id: str, event_id: str) -> dict[str, Any]:
    """The one notice the client shows in reply to ``event_id``, once it is there."""
    async def shown() -> bool:
        return bool(_replies_to(await human.messages(room_id), event_id))

    await wait_for(shown, what=f"a notice in reply to {event_id}")
    [notice] = _replies_to(await human.messages(room_id), event_id)
    return notice


# --- messages that do not reach the contact ------------------------------------------------------

async def test_dead_lettered_reply_is_told_once_and_corrected_when_a_retry_delivers_it(
    start_bridge: BridgeFactory, platform: Platform, new_human: NewHuman
) -> None:
    """The webhook refuses a reply until the attempts run out: the human's client shows a notice
    from the contact in reply to it, once (a restarted bridge does not repeat it). Queued again
    and delivered, the notice is edited to say it got through."""
    async with WebhookReceiver(SECRET) as rx:
        networks = {"sms": {"delivery": {"mode": "webhook", "url": rx.url, "secret": SECRET}}}
        bridge = await start_bridge(networks=networks, **FAST)
        human, phone = await new_human(), _phone()
        ghost_id = bridge.settings.networks.get("sms").ghost_user_id(phone)
        room_id = await _dm_with(platform, bridge, human, "sms", SMS_TOKEN, phone)

        rx.down(422)
        lost = await human.say(room_id, "see you at 8")
        notice = await _notice_for(human, room_id, lost)
        assert notice["sender"] == ghost_id
        assert notice["content"]["msgtype"] == "m.notice"
        assert notice["content"]["body"] == (
            "\N{WARNING SIGN}\N{VARIATION SELECTOR-16} Not delivered: SMS did not accept this"
            " message. The bridge's administrator can send it again; you will see here if it"
            " gets through.")

        await bridge.stop()  # another process (or worker) takes over: nothing is told twice
        bridge = await start_bridge(networks=networks, **FAST)
        assert await bridge.undelivered.send_due() == 0
        told = await bridge.stores.undelivered.get(lost)
        assert told is not None and (told.told, told.shown) == (FAILED, FAILED)
        assert told.notice_event_id == notice["event_id"]

        rx.up()
        status, dead = await platform.call("GET", "/networks/sms/dead-letters", SMS_TOKEN)
        assert status == 200, dead
        [letter] = [d for d in dead["dead_letters"] if d["idempotency_key"] == lost]
        status, _ = await platform.call("POST", "/networks/sms/dead-letters/retry", SMS_TOKEN,
                                        json={"ids": [letter["id"]]})
        assert status == 200
        await rx.wait_accepted(1)

        async def corrected() -> bool:
            return bool(_edits_of(await human.messages(room_id), notice["event_id"]))

        await wait_for(corrected, what="the notice to be edited")
        events = await human.messages(room_id)
        [edit] = _edits_of(events, notice["event_id"])
        assert edit["sender"] == ghost_id
        assert edit["content"]["m.new_content"] == {
            "msgtype": "m.notice",
            "body": "\N{WHITE HEAVY CHECK MARK} Delivered after all: SMS accepted this message"
                    " on a later attempt."}
        assert len(_replies_to(events, lost)) == 1  # still one notice, now edited
        told = await bridge.stores.undelivered.get(lost)
        assert told is not None and (told.told, told.shown) == (DELIVERED, DELIVERED)


async def test_reply_a_pull_network_never_took_is_told_and_corrected_once_acknowledged(
    start_bridge: BridgeFactory, platform: Platform, new_human: NewHuman
) -> None:
    """A pull network does not take a reply within delivery.max_age: the human is told; the
    dead letter queued again is pulled and acknowledged, and the notice says it got through."""
    bridge = await start_bridge(**{"delivery.max_age": 3})
    human, contact = await new_human(), _contact()
    room_id = await _dm_with(platform, bridge, human, "chat", CHAT_TOKEN, contact)
    lost = await human.say(room_id, "anyone pulling?")
    notice = await _notice_for(human, room_id, lost)
    assert "Not delivered: Chat did not accept this message" in notice["content"]["body"]

    status, dead = await platform.call("GET", "/networks/chat/dead-letters", CHAT_TOKEN)
    assert status == 200, dead
    [letter] = [d for d in dead["dead_letters"] if d["idempotency_key"] == lost]
    status, _ = await platform.call("POST", "/networks/chat/dead-letters/retry", CHAT_TOKEN,
                                    json={"ids": [letter["id"]]})
    assert status == 200
    await Feed(platform).expect("message", room_id=room_id, text="anyone pulling?")

    async def corrected() -> bool:
        return bool(_edits_of(await human.messages(room_id), notice["event_id"]))

    await wait_for(corrected, what="the notice to be edited")
    [edit] = _edits_of(await human.messages(room_id), notice["event_id"])
    assert edit["content"]["m.new_content"]["body"].endswith(
        "Delivered after all: Chat accepted this message on a later attempt.")


async def test_message_in_a_room_that_stopped_being_a_dm_is_told_not_delivered(
    bridge: Bridge, platform: Platform, new_human: NewHuman
) -> None:
    """A friend joined, so the bridge does not deliver what is said there: the human's client
    shows why, in reply to the message."""
    human, friend = await new_human(), await new_human()
    feed, contact = Feed(platform), _contact()
    ghost_id = bridge.settings.networks.get("chat").ghost_user_id(contact)
    room_id = await _dm_with(platform, bridge, human, "chat", CHAT_TOKEN, contact)
    await human.client.room_invite(room_id, friend.user_id)
    await friend.wait_invite(room_id)
    await friend.join(room_id)
    await feed.expect("dm.ended", room_id=room_id, reason="third_party_joined")

    kept = await human.say(room_id, "just between friends")
    notice = await _notice_for(human, room_id, kept)
    assert notice["sender"] == ghost_id
    assert notice["content"]["msgtype"] == "m.notice"
    assert "Not delivered: someone else joined this room" in notice["content"]["body"]
    assert "just between friends" not in feed.texts()


# --- DMs started from Matrix that fail -----------------------------------------------------------

@pytest.fixture
async def proxy(homeserver: Homeserver) -> AsyncIterator[HoldingProxy]:
    async with HoldingProxy(homeserver.url) as running:
        yield running


async def test_invite_whose_join_fails_is_refused_with_the_reason(
    proxy: HoldingProxy, start_bridge: BridgeFactory, new_human: NewHuman
) -> None:
    """The homeserver refuses the ghost's join: the ghost turns the invite down, and the
    inviter's client shows why."""
    bridge = await start_bridge(**{"homeserver.address": proxy.url})
    human = await new_human()
    contact = _contact()
    ghost_id = bridge.settings.networks.get("chat").ghost_user_id(contact)
    # Only the bridge goes through the proxy, and it joins rooms only to answer invites.
    proxy.answer("POST", "/join", 403,
                 {"errcode": "M_FORBIDDEN", "error": "Joining is not allowed here"})
    resp = await human.client.room_create(is_direct=True, invite=[ghost_id],
                                          preset=RoomPreset.private_chat)
    assert isinstance(resp, RoomCreateResponse), resp
    await human.wait_membership(resp.room_id, ghost_id, "leave")
    assert await human.leave_reason(resp.room_id, ghost_id) == (
        "The Chat contact could not join this room (Joining is not allowed here), so the chat"
        " was not started.")
    assert await bridge.stores.dms.get_current(ghost_id, human.user_id) is None  # type: ignore[arg-type]


async def test_invite_whose_join_meets_a_homeserver_failure_is_answered_later(
    proxy: HoldingProxy, start_bridge: BridgeFactory, platform: Platform, new_human: NewHuman
) -> None:
    """The homeserver fails the ghost's join once (HTTP 500): that is not a refusal, so the
    invite is answered in a later round and the room becomes the DM."""
    bridge = await start_bridge(**{"homeserver.address": proxy.url})
    human, feed = await new_human(), Feed(platform)
    ghost_id = bridge.settings.networks.get("chat").ghost_user_id(_contact())
    proxy.answer("POST", "/join", 500, {"errcode": "M_UNKNOWN", "error": "Internal error"})
    room_id = await human.create_dm(ghost_id)
    await feed.expect("dm.started", room_id=room_id)
    assert await human.membership(room_id, ghost_id) == "join"
    assert not any(r.path_end == "/join" for r in proxy.rules)  # the 500 was answered


async def test_invite_into_a_room_with_a_third_person_only_invited_is_adopted(
    bridge: Bridge, platform: Platform, new_human: NewHuman
) -> None:
    """The human invites the contact and a friend who has not answered: nobody else has joined,
    so the room is their DM; the friend's invite stays pending."""
    human, friend = await new_human(), await new_human()
    feed, contact = Feed(platform), _contact()
    ghost_id = bridge.settings.networks.get("chat").ghost_user_id(contact)
    resp = await human.client.room_create(is_direct=True, invite=[ghost_id, friend.user_id],
                                          preset=RoomPreset.private_chat)
    assert isinstance(resp, RoomCreateResponse), resp
    await feed.expect("dm.started", room_id=resp.room_id)
    assert await human.membership(resp.room_id, ghost_id) == "join"
    assert await human.membership(resp.room_id, friend.user_id) == "invite"
    await human.say(resp.room_id, "just us for now")
    await feed.expect("message", room_id=resp.room_id, text="just us for now")


async def test_invite_into_a_room_a_third_person_joined_is_refused(
    bridge: Bridge, new_human: NewHuman
) -> None:
    """A friend has joined the room already: not a one-to-one chat, and the ghost says so as
    it leaves."""
    human, friend = await new_human(), await new_human()
    ghost_id = bridge.settings.networks.get("chat").ghost_user_id(_contact())
    resp = await human.client.room_create(is_direct=True, invite=[friend.user_id],
                                          preset=RoomPreset.private_chat)
    assert isinstance(resp, RoomCreateResponse), resp
    await friend.wait_invite(resp.room_id)
    await friend.join(resp.room_id)
    invited = await human.client.room_put_state(
        resp.room_id, "m.room.member", {"membership": "invite", "is_direct": True},
        state_key=ghost_id)
    assert isinstance(invited, RoomPutStateResponse), invited
    await human.wait_membership(resp.room_id, ghost_id, "leave")
    assert await human.leave_reason(resp.room_id, ghost_id) == (
        "Chat contacts only take one-to-one chats.")


# --- bridge state of adopted rooms ---------------------------------------------------------------

def _bridge_state(state: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    return sorted((e["type"], e["state_key"], e["content"]) for e in state
                  if e["type"] in BRIDGE_TYPES)


async def test_adopted_room_carries_the_same_bridge_state_as_a_created_one(
    bridge: Bridge, platform: Platform, new_human: NewHuman
) -> None:
    """The human starts a DM (the trusted_private_chat preset gives the ghost power, as
    Element's DMs do): the ghost sets the bridge state a room the bridge creates has."""
    human = await new_human()
    feed, contact = Feed(platform), _contact()
    ghost_id = bridge.settings.networks.get("chat").ghost_user_id(contact)
    created = await _dm_with(platform, bridge, human, "chat", CHAT_TOKEN, contact)
    expected = _bridge_state(await human.state(created))
    assert [t for t, _, _ in expected] == sorted(BRIDGE_TYPES)

    resp = await human.client.room_create(is_direct=True, invite=[ghost_id],
                                          preset=RoomPreset.trusted_private_chat)
    assert isinstance(resp, RoomCreateResponse), resp
    await feed.expect("dm.started", room_id=resp.room_id)

    async def marked() -> bool:
        return len(_bridge_state(await human.state(resp.room_id))) == 2

    await wait_for(marked, what="the bridge state in the adopted room")
    assert _bridge_state(await human.state(resp.room_id)) == expected


async def test_adopted_room_without_power_for_the_ghost_works_without_bridge_state(
    bridge: Bridge, platform: Platform, new_human: NewHuman, caplog: pytest.LogCaptureFixture
) -> None:
    """In a private_chat room the ghost may not set state: the DM works all the same, and the
    log says why the room has no bridge state."""
    human = await new_human()
    feed, contact = Feed(platform), _contact()
    ghost_id = bridge.settings.networks.get("chat").ghost_user_id(contact)
    room_id = await human.create_dm(ghost_id)
    await feed.expect("dm.started", room_id=room_id)
    await human.say(room_id, "hello there")
    await feed.expect("message", room_id=room_id, text="hello there")
    expected = f"{room_id}: no bridge state: {ghost_id} may not set state"

    async def logged() -> bool:
        return any(expected in r.getMessage() for r in caplog.records)

    await wait_for(logged, what="the log line saying why")
    assert _bridge_state(await human.state(room_id)) == []
