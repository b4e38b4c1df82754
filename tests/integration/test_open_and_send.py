"""A platform DMs a Matrix user: what the human's client shows, and what the platform gets."""

from __future__ import annotations

import asyncio
import uuid

from dmbridge.bridge import Bridge
from tests.integration.conftest import BridgeFactory, Platform, accept_dm, bridge_sees
from tests.support.matrix import Human
from tests.support.settings import SMS_TOKEN

PHONE = "+15551234567"


def _phone() -> str:
    return "+1555" + str(uuid.uuid4().int)[:7]


async def test_first_message_arrives_as_a_direct_invite(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    human: Human = await new_human()
    phone = _phone()
    status, body = await platform.send("sms", SMS_TOKEN, "m1", sender=phone,
                                       sender_name="Alice", recipient=human.user_id,
                                       text="Hello Bob", html="<b>Hello</b> Bob")
    assert status == 200, body
    assert body["room_created"] is True and body["duplicate"] is False
    room_id, ghost = body["room_id"], f"@dm_sms_=2b{phone[1:]}:localhost"

    invite = await human.wait_invite(room_id)
    assert invite.sender == ghost
    assert invite.content.get("is_direct") is True
    await human.join(room_id)
    [message] = await human.wait_messages(room_id, 1)
    assert message["sender"] == ghost
    assert message["event_id"] == body["event_id"]
    assert message["content"]["body"] == "Hello Bob"
    assert message["content"]["formatted_body"] == "<b>Hello</b> Bob"

    state = await human.state(room_id)
    members = {e["state_key"]: e["content"] for e in state if e["type"] == "m.room.member"}
    assert set(members) == {ghost, human.user_id}, "exactly the ghost and the user, no bot"
    assert members[ghost]["displayname"] == "Alice (SMS)"
    bridge_state = [e for e in state if e["type"] in ("m.bridge", "uk.half-shot.bridge")]
    assert {e["type"] for e in bridge_state} == {"m.bridge", "uk.half-shot.bridge"}
    assert bridge_state[0]["content"]["protocol"]["id"] == "sms"
    assert bridge_state[0]["content"]["channel"]["id"] == phone
    power = next(e["content"] for e in state if e["type"] == "m.room.power_levels")
    assert power["users"].get(human.user_id) == 100


async def _joined_dm(bridge: Bridge, platform: Platform, human: Human, phone: str,
                    message_id: str, text: str) -> str:
    """First message; the human accepts; returns once the bridge has recorded the join."""
    status, first = await platform.send("sms", SMS_TOKEN, message_id, sender=phone,
                                        recipient=human.user_id, text=text)
    assert status == 200, first
    room_id: str = first["room_id"]
    await accept_dm(human, room_id, bridge)
    return room_id


async def test_second_message_reuses_the_room_with_one_request(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    human = await new_human()
    phone = _phone()
    room_id = await _joined_dm(bridge, platform, human, phone, "a", "one")

    before = bridge.requests.total
    status, second = await platform.send("sms", SMS_TOKEN, "b", sender=phone,
                                         recipient=human.user_id, text="two")
    assert status == 200, second
    assert second["room_id"] == room_id and second["room_created"] is False
    assert bridge.requests.total - before == 1
    method, path = bridge.requests.recent[-1]
    assert method == "PUT" and "/send/m.room.message/" in path
    texts = [m["content"]["body"] for m in await human.wait_messages(room_id, 2)]
    assert texts == ["one", "two"]


async def test_restart_reuses_the_same_room(
    start_bridge: BridgeFactory, platform: Platform, new_human
) -> None:
    human = await new_human()
    phone = _phone()
    bridge = await start_bridge()
    _, first = await platform.send("sms", SMS_TOKEN, "r1", sender=phone,
                                   recipient=human.user_id, text="before restart")
    await asyncio.sleep(0.3)
    await bridge.stop()

    await start_bridge()
    status, second = await platform.send("sms", SMS_TOKEN, "r2", sender=phone,
                                         recipient=human.user_id, text="after restart")
    assert status == 200, second
    assert second["room_id"] == first["room_id"] and second["room_created"] is False
    await human.wait_invite(first["room_id"])
    await human.join(first["room_id"])
    texts = [m["content"]["body"] for m in await human.wait_messages(first["room_id"], 2)]
    assert texts == ["before restart", "after restart"]


async def test_twenty_simultaneous_first_messages_make_one_room(
    bridge: Bridge, platform: Platform, new_human, homeserver
) -> None:
    human = await new_human()
    phone = _phone()
    results = await asyncio.gather(*(
        platform.send("sms", SMS_TOKEN, f"c{i}", sender=phone, recipient=human.user_id,
                      text=f"message {i}")
        for i in range(20)
    ))
    assert all(status == 200 for status, _ in results), results
    rooms = {body["room_id"] for _, body in results}
    assert len(rooms) == 1
    assert sum(body["room_created"] for _, body in results) == 1
    [room_id] = rooms
    await human.wait_invite(room_id)
    await human.join(room_id)
    texts = sorted(m["content"]["body"] for m in await human.wait_messages(room_id, 20))
    assert texts == sorted(f"message {i}" for i in range(20))
    joined = await human.client.joined_rooms()
    assert joined.rooms == [room_id]  # type: ignore[union-attr]


async def test_retried_request_posts_once(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    human = await new_human()
    phone = _phone()
    first = await platform.send("sms", SMS_TOKEN, "same-id", sender=phone,
                                recipient=human.user_id, text="only once")
    retries = await asyncio.gather(*(
        platform.send("sms", SMS_TOKEN, "same-id", sender=phone, recipient=human.user_id,
                      text="only once")
        for _ in range(3)
    ))
    assert first[0] == 200
    for status, body in retries:
        assert status == 200
        assert body["event_id"] == first[1]["event_id"]
        assert body["duplicate"] is True
    room_id = first[1]["room_id"]
    await human.wait_invite(room_id)
    await human.join(room_id)
    await asyncio.sleep(0.5)
    assert [m["content"]["body"] for m in await human.messages(room_id)] == ["only once"]


async def test_user_who_left_is_invited_back_into_the_same_room(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    human = await new_human()
    phone = _phone()
    room_id = await _joined_dm(bridge, platform, human, phone, "l1", "hi")
    await human.leave(room_id)
    await bridge_sees(bridge, room_id, human.user_id, "leave")

    human.invites.clear()
    status, second = await platform.send("sms", SMS_TOKEN, "l2", sender=phone,
                                         recipient=human.user_id, text="are you there?")
    assert status == 200, second
    assert second["room_id"] == room_id and second["room_created"] is False
    invite = await human.wait_invite(room_id)
    assert invite.content.get("is_direct") is True
    await human.join(room_id)
    texts = [m["content"]["body"] for m in await human.wait_messages(room_id, 2)]
    assert texts[-1] == "are you there?"


async def test_a_third_member_makes_the_next_message_open_a_new_dm(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    human, friend = await new_human(), await new_human()
    phone = _phone()
    room_id = await _joined_dm(bridge, platform, human, phone, "t1", "private")
    await human.client.room_invite(room_id, friend.user_id)
    await friend.wait_invite(room_id)
    await friend.join(room_id)
    await bridge_sees(bridge, room_id, friend.user_id, "join")

    status, second = await platform.send("sms", SMS_TOKEN, "t2", sender=phone,
                                         recipient=human.user_id, text="still private")
    assert status == 200, second
    assert second["room_id"] != room_id and second["room_created"] is True
    await human.wait_invite(second["room_id"])
    assert [m["content"]["body"] for m in await human.messages(room_id)] == ["private"]
