"""A fresh DM on request, the network's description, messages with their original time, and
threads both ways: as the human's client and the platform see them."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from dmbridge_client import escape_remote_id

from dmbridge.bridge import Bridge
from dmbridge.opening import MOVED_REASON
from tests.integration.conftest import BridgeFactory, Platform, accept_dm
from tests.integration.test_relations import _post, _processed, _wait_event
from tests.support.feed import Feed
from tests.support.matrix import Human
from tests.support.settings import CHAT_TOKEN, SMS_TOKEN

NET = "chat"
DAY_MS = 86_400_000


def _contact() -> str:
    return f"r{uuid.uuid4().hex[:10]}"


async def _open(platform: Platform, contact: str, human: Human, **body: Any
                ) -> tuple[int, Any]:
    return await platform.call("POST", f"/networks/{NET}/dms", CHAT_TOKEN,
                               json={"sender": contact, "recipient": human.user_id, **body})


async def _send(platform: Platform, contact: str, human: Human, message_id: str,
                **body: Any) -> dict[str, Any]:
    status, sent = await platform.send(NET, CHAT_TOKEN, message_id, sender=contact,
                                       recipient=human.user_id, **body)
    assert status == 200, sent
    return sent


async def test_a_fresh_dm_ends_the_old_room_and_later_messages_go_to_the_new_one(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    human = await new_human()
    contact = _contact()
    ghost = str(bridge.settings.networks.get(NET).ghost_user_id(contact))
    feed = Feed(platform)
    old = (await _send(platform, contact, human, "m1", text="first"))["room_id"]
    await accept_dm(human, old, bridge)

    status, opened = await _open(platform, contact, human, new=True, replaces=old)
    assert status == 200, opened
    new = opened["room_id"]
    assert new != old
    assert (opened["created"], opened["replaced_room_id"], opened["state"]) == (True, old,
                                                                                "active")
    # The human: the contact left the old room saying why, and invites them to a new one.
    await human.wait_membership(old, ghost, "leave")
    assert await human.leave_reason(old, ghost) == MOVED_REASON
    invite = await human.wait_invite(new)
    assert invite.content.get("is_direct") is True
    ended = await feed.expect("dm.ended", room_id=old)
    assert ended["dm"] == {"state": "ended", "reason": "replaced_by_platform", "event_id": None}

    # A retry of the same request finds the room replaced already: no third room.
    status, again = await _open(platform, contact, human, new=True, replaces=old)
    assert status == 200, again
    assert (again["room_id"], again["created"], again["replaced_room_id"]) == (new, False, None)

    sent = await _send(platform, contact, human, "m2", text="second")
    assert (sent["room_id"], sent["room_created"]) == (new, False)
    await human.join(new)
    assert [m["content"]["body"] for m in await human.wait_messages(new, 1)] == ["second"]

    # What the human writes in the old room no longer reaches the platform; in the new one,
    # it does (one lane: the old room's message would have come first).
    await human.say(old, "in the old room")
    await human.say(new, "in the new room")
    await feed.expect("message", room_id=new, text="in the new room")
    assert "in the old room" not in feed.texts()

    # Without replaces, new: true opens one more room each time; replaces needs new.
    status, third = await _open(platform, contact, human, new=True)
    assert status == 200 and third["replaced_room_id"] == new and third["room_id"] != new
    status, refused = await _open(platform, contact, human, replaces=new)
    assert (status, refused) == (400, {"errcode": "M_INVALID_PARAM",
                                       "error": "'replaces' goes with 'new': true"})
    status, refused = await _open(platform, contact, human, new="yes")
    assert (status, refused["errcode"]) == (400, "M_BAD_JSON")
    for not_a_room in ("", "room"):
        status, refused = await _open(platform, contact, human, new=True, replaces=not_a_room)
        assert (status, refused["errcode"]) == (400, "M_INVALID_PARAM"), refused
        assert refused["error"].startswith("'replaces' must be a room ID")
    current = await platform.call("GET", f"/networks/{NET}/dms", CHAT_TOKEN,
                                  params={"user_id": human.user_id})
    assert [dm["room_id"] for dm in current[1]["dms"]] == [third["room_id"]]


async def test_a_fresh_dm_past_the_quota_leaves_the_current_dm_as_the_human_had_it(
    start_bridge: BridgeFactory, platform: Platform, new_human
) -> None:
    bridge = await start_bridge(networks={"chat": {"quotas": {"new_dms_per_hour": 1}}})
    human = await new_human()
    contact = _contact()
    ghost = str(bridge.settings.networks.get(NET).ghost_user_id(contact))
    old = (await _send(platform, contact, human, "m1", text="first"))["room_id"]
    await accept_dm(human, old, bridge)

    status, refused = await _open(platform, contact, human, new=True, replaces=old)
    assert (status, refused["errcode"]) == (429, "DMBRIDGE_QUOTA_EXCEEDED"), refused
    # The contact is still in the room, and the next message lands there.
    sent = await _send(platform, contact, human, "m2", text="second")
    assert (sent["room_id"], sent["room_created"]) == (old, False)
    assert [m["content"]["body"] for m in await human.wait_messages(old, 2)] == [
        "first", "second"]
    assert await human.membership(old, ghost) == "join"


async def test_a_declined_dm_stays_declined_when_a_fresh_one_is_asked_for(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    human = await new_human()
    contact = _contact()
    feed = Feed(platform)
    room = (await _send(platform, contact, human, "m1", text="hello"))["room_id"]
    await human.wait_invite(room)
    await human.reject(room)
    await feed.expect("dm.declined", room_id=room)
    status, refused = await _open(platform, contact, human, new=True)
    assert (status, refused["errcode"]) == (403, "DMBRIDGE_DECLINED")


async def test_the_network_describes_itself_to_its_own_token_only(
    bridge: Bridge, platform: Platform
) -> None:
    status, info = await platform.call("GET", f"/networks/{NET}", CHAT_TOKEN)
    assert status == 200, info
    network = bridge.settings.networks.get(NET)
    assert info["network"] == NET and info["name"] == "Chat"
    assert info["api_version"] == "v1"
    assert info["delivery"] == {"mode": "pull"}
    template = info["ghost_user_id_template"]
    assert template == f"@dm_chat_{{remote_id}}:{bridge.settings.domain}"
    # The pattern and the template, filled with the ID escaped as documented, are enough to
    # check an ID and name its ghost locally.
    assert not re.fullmatch(info["remote_id_pattern"], "+15551234567")
    for remote_id in ("bob.smith", "Bob_Smith"):
        assert re.fullmatch(info["remote_id_pattern"], remote_id)
        assert template.replace("{remote_id}", escape_remote_id(remote_id)) == \
            network.ghost_user_id(remote_id)
    assert template.replace("{remote_id}", escape_remote_id("Bob_Smith")) == \
        f"@dm_chat__bob___smith:{bridge.settings.domain}"
    assert info["limits"]["max_body_bytes"] == bridge.settings.max_body_bytes
    assert info["limits"]["ts_max_ahead_ms"] == 300_000
    assert info["quotas"]["new_dms_per_hour"] == network.quotas.new_dms_per_hour

    status, refused = await platform.call("GET", f"/networks/{NET}", SMS_TOKEN)
    assert (status, refused["errcode"]) == (403, "M_FORBIDDEN")
    status, refused = await platform.call("GET", f"/networks/{NET}", None)
    assert (status, refused["errcode"]) == (401, "M_MISSING_TOKEN")


async def test_a_late_message_keeps_its_original_time_in_the_humans_client(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    human = await new_human()
    contact = _contact()
    written = int(time.time() * 1000) - 3 * DAY_MS
    first = await _send(platform, contact, human, "m1", text="queued for three days",
                        ts=written)
    room = first["room_id"]
    await accept_dm(human, room, bridge)
    event = await _wait_event(human, room, first["event_id"])
    assert event["origin_server_ts"] == written
    # Without ts, the homeserver's time.
    second = await _send(platform, contact, human, "m2", text="now")
    assert (await _wait_event(human, room, second["event_id"]))["origin_server_ts"] > written

    ahead = int(time.time() * 1000) + 3_600_000
    status, refused = await platform.send(NET, CHAT_TOKEN, "m3", sender=contact,
                                          recipient=human.user_id, text="?", ts=ahead)
    assert status == 400 and refused["errcode"] == "M_INVALID_PARAM", refused
    assert refused["error"].startswith(f"'ts' {ahead} is ")
    assert refused["error"].endswith("at most 300 s ahead is accepted (milliseconds since the"
                                     " epoch)")
    status, refused = await platform.send(NET, CHAT_TOKEN, "m3", sender=contact,
                                          recipient=human.user_id, text="?",
                                          ts=written // 1000)
    assert (status, refused) == (400, {
        "errcode": "M_INVALID_PARAM",
        "error": f"'ts' {written // 1000} is before 1990-01-01; it must be milliseconds since"
                 " the epoch (seconds given for milliseconds?)"})
    status, refused = await platform.send(NET, CHAT_TOKEN, "m3", sender=contact,
                                          recipient=human.user_id, text="?", ts=1.5e12)
    assert (status, refused) == (400, {"errcode": "M_BAD_JSON",
                                       "error": "'ts' must be an integer"})


async def test_threads_both_ways(bridge: Bridge, platform: Platform, new_human) -> None:
    human = await new_human()
    contact = _contact()
    feed = Feed(platform)
    root = await _send(platform, contact, human, "root", text="Your order has shipped.")
    room = root["room_id"]
    await accept_dm(human, room, bridge)

    # The platform writes into the thread of its own message: an m.thread with the fallback.
    in_thread = await _send(platform, contact, human, "t1", text="It left the depot.",
                            thread_root={"message_id": "root"})
    event = await _wait_event(human, room, in_thread["event_id"])
    assert event["content"]["m.relates_to"] == {
        "rel_type": "m.thread", "event_id": root["event_id"], "is_falling_back": True,
        "m.in_reply_to": {"event_id": root["event_id"]}}

    # The human answers in the thread, as Element does: the platform gets the thread's root by
    # its own message ID, and no reply (the in_reply_to is only the fallback).
    answer = await _post(human, room, "m.room.message", {
        "msgtype": "m.text", "body": "When will it arrive?",
        "m.relates_to": {"rel_type": "m.thread", "event_id": root["event_id"],
                         "is_falling_back": True,
                         "m.in_reply_to": {"event_id": in_thread["event_id"]}}})
    got = (await feed.expect("message", room_id=room, text="When will it arrive?"))["message"]
    assert got["thread_root"] == {"event_id": root["event_id"], "message_id": "root",
                                  "kind": "message"}
    assert got["reply_to"] is None
    # An explicit reply inside the thread keeps its reply_to.
    await _post(human, room, "m.room.message", {
        "msgtype": "m.text", "body": "Thanks!",
        "m.relates_to": {"rel_type": "m.thread", "event_id": root["event_id"],
                         "is_falling_back": False,
                         "m.in_reply_to": {"event_id": in_thread["event_id"]}}})
    got = (await feed.expect("message", room_id=room, text="Thanks!"))["message"]
    assert got["reply_to"] == {"event_id": in_thread["event_id"], "message_id": "t1",
                               "kind": "message"}
    assert got["thread_root"]["message_id"] == "root"
    # A message outside threads has none.
    await human.say(room, "plain")
    assert (await feed.expect("message", room_id=room, text="plain"))["message"][
        "thread_root"] is None

    # The platform answers the human's message in the thread: a real reply, not a fallback.
    await _processed(bridge, answer)
    reply = await _send(platform, contact, human, "t2", text="Tomorrow.",
                        thread_root={"message_id": "root"}, reply_to={"event_id": answer})
    event = await _wait_event(human, room, reply["event_id"])
    assert event["content"]["m.relates_to"] == {
        "rel_type": "m.thread", "event_id": root["event_id"], "is_falling_back": False,
        "m.in_reply_to": {"event_id": answer}}

    # Refused: a root that is itself in the thread (its root is the one to name), an unknown
    # root, a root that is an edit, a thread with an edit.
    status, refused = await platform.send(NET, CHAT_TOKEN, "x1", sender=contact,
                                          recipient=human.user_id, text="?",
                                          thread_root={"message_id": "t1"})
    assert (status, refused) == (400, {
        "errcode": "M_INVALID_PARAM",
        "error": "message t1 is itself in a thread; give the thread's root as thread_root"})
    status, refused = await platform.send(NET, CHAT_TOKEN, "x1", sender=contact,
                                          recipient=human.user_id, text="?",
                                          thread_root={"message_id": "nope"})
    assert (status, refused["errcode"]) == (404, "M_NOT_FOUND"), refused
    await _send(platform, contact, human, "e1", text="Your order has left.", edits="root")
    status, refused = await platform.send(NET, CHAT_TOKEN, "x1", sender=contact,
                                          recipient=human.user_id, text="?",
                                          thread_root={"message_id": "e1"})
    assert (status, refused["errcode"]) == (400, "M_INVALID_PARAM"), refused
    status, refused = await platform.send(NET, CHAT_TOKEN, "x1", sender=contact,
                                          recipient=human.user_id, text="?", edits="t1",
                                          thread_root={"message_id": "root"})
    assert (status, refused) == (400, {
        "errcode": "M_INVALID_PARAM",
        "error": "an edit replaces a message's text; it takes no reply_to, thread_root or"
                 " media"})
