"""Typing notices and read receipts both ways, as the human's client and the platform see them."""

from __future__ import annotations

import uuid
from typing import Any

from dmbridge.bridge import Bridge
from tests.integration.conftest import Platform, accept_dm
from tests.support.feed import Feed
from tests.support.settings import CHAT_TOKEN


async def test_typing_and_receipts_cross_both_ways(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    """The platform sees the human type and read; the human sees the contact type and read."""
    human = await new_human()
    contact = f"t{uuid.uuid4().hex[:10]}"
    ghost = bridge.settings.networks.get("chat").ghost_user_id(contact)
    status, sent = await platform.send("chat", CHAT_TOKEN, "first", sender=contact,
                                       recipient=human.user_id, text="Are you there?")
    assert status == 200, sent
    room_id = sent["room_id"]
    await accept_dm(human, room_id, bridge)
    feed = Feed(platform)

    # The human types, stops, and reads the platform's message.
    await human.client.room_typing(room_id, True, 20_000)
    started = await feed.expect("typing", room_id=room_id)
    assert started["typing"] is True and started["user_id"] == human.user_id
    await human.client.room_typing(room_id, False)
    stopped = await feed.expect("typing", room_id=room_id)
    assert stopped["typing"] is False
    await human.client.update_receipt_marker(room_id, sent["event_id"])
    read = await feed.expect("read", room_id=room_id)
    assert read["read"]["message_id"] == "first" and read["read"]["event_id"] == sent["event_id"]

    # The contact types and reads the human's reply.
    reply_id = await human.say(room_id, "Yes, here")
    message = await feed.expect("message", room_id=room_id, text="Yes, here")
    status, body = await platform.call("PUT", "/networks/chat/typing", CHAT_TOKEN, json={
        "sender": contact, "recipient": human.user_id, "typing": True, "timeout_ms": 20_000})
    assert (status, body) == (200, {"room_id": room_id})
    def room() -> Any:
        return human.client.rooms.get(room_id)

    await human.sync_until(lambda: room() is not None and ghost in room().typing_users)
    status, body = await platform.call("POST", "/networks/chat/read", CHAT_TOKEN, json={
        "sender": contact, "recipient": human.user_id, "event_id": message["message"]["event_id"]})
    assert (status, body) == (200, {"room_id": room_id})
    await human.sync_until(lambda: room() is not None and getattr(
        room().read_receipts.get(ghost), "event_id", None) == reply_id)

    # A receipt for a message the platform was never given, or a DM that does not exist.
    status, err = await platform.call("POST", "/networks/chat/read", CHAT_TOKEN, json={
        "sender": contact, "recipient": human.user_id, "event_id": sent["event_id"]})
    assert (status, err["errcode"]) == (404, "M_NOT_FOUND"), err
    status, err = await platform.call("PUT", "/networks/chat/typing", CHAT_TOKEN, json={
        "sender": "nobody-known", "recipient": human.user_id, "typing": True})
    assert (status, err["errcode"]) == (404, "M_NOT_FOUND"), err
    status, err = await platform.call("PUT", "/networks/chat/typing", CHAT_TOKEN, json={
        "sender": contact, "recipient": human.user_id, "typing": "yes"})
    assert (status, err["errcode"]) == (400, "M_BAD_JSON"), err
