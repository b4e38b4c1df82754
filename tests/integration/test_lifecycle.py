"""A DM's life as users see it: leaves, declines, strangers, Matrix-started DMs, permissions.

Each test drives a real Synapse through a Matrix client (the human) and the bridge's HTTP API
(the platform), which reads its notices from the pull feed.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any
from urllib.parse import quote

import pytest
from nio import AsyncClient, LoginResponse

from dmbridge.bridge import Bridge
from dmbridge.errors import NotFound
from tests.integration.conftest import (
    PASSWORD,
    BridgeFactory,
    Homeserver,
    NewHuman,
    Platform,
    accept_dm,
    wait_for,
)
from tests.support.feed import Feed
from tests.support.matrix import Human
from tests.support.settings import CHAT_TOKEN

NET = "chat"


def _contact() -> str:
    """A remote ID never seen before (lower case, so its ghost's localpart is the same)."""
    return f"c{uuid.uuid4().hex[:12]}"


def _ghost(bridge: Bridge, contact: str) -> str:
    return bridge.settings.networks.get(NET).ghost_user_id(contact)


async def _send(platform: Platform, human: Human, contact: str, text: str) -> tuple[int, Any]:
    return await platform.send(NET, CHAT_TOKEN, uuid.uuid4().hex, sender=contact,
                               recipient=human.user_id, text=text)


async def _sent(platform: Platform, human: Human, contact: str, text: str) -> dict[str, Any]:
    status, body = await _send(platform, human, contact, text)
    assert status == 200, body
    return dict(body)


async def _refused_as_declined(platform: Platform, human: Human, contact: str) -> str:
    """Both ways of reaching the user answer 403 DMBRIDGE_DECLINED; the send's error text."""
    status, body = await _send(platform, human, contact, "anyone there?")
    assert status == 403, body
    assert body["errcode"] == "DMBRIDGE_DECLINED", body
    status, opened = await platform.call("POST", f"/networks/{NET}/dms", CHAT_TOKEN,
                                         json={"sender": contact, "recipient": human.user_id})
    assert status == 403 and opened["errcode"] == "DMBRIDGE_DECLINED", opened
    return str(body["error"])


async def _joined_dm(bridge: Bridge, platform: Platform, human: Human, contact: str) -> str:
    """The platform writes first; the human accepts; returns once the bridge knows of the join."""
    first = await _sent(platform, human, contact, "hello")
    room_id: str = first["room_id"]
    await accept_dm(human, room_id, bridge)
    return room_id


async def _dm_from_matrix(human: Human, ghost_id: str, feed: Feed) -> str:
    """The human starts a DM with the ghost; returns once the ghost joined and it is the DM."""
    room_id = await human.create_dm(ghost_id)
    await human.wait_membership(room_id, ghost_id, "join")
    started = await feed.expect("dm.started", room_id=room_id)
    assert started["dm"]["reason"] == "user_invited"
    assert started["ghost_id"] == ghost_id and started["user_id"] == human.user_id
    return room_id


async def _lands(human: Human, room_id: str, text: str) -> None:
    """The human's client shows ``text`` as the newest message of the room."""
    async def shown() -> bool:
        messages = await human.messages(room_id)
        return bool(messages) and messages[-1]["content"]["body"] == text
    await wait_for(shown, what=f"{text!r} in {room_id}")


async def _invite_marker(platform: Platform, human: Human) -> str:
    """Another contact writes: an invite the human's sync must show after anything earlier."""
    body = await _sent(platform, human, _contact(), "a marker from someone else")
    await human.wait_invite(body["room_id"])
    return str(body["room_id"])


# --- the user leaves --------------------------------------------------------------------------

async def test_user_who_left_is_told_of_and_invited_back_into_the_same_room(
    bridge: Bridge, platform: Platform, new_human: NewHuman
) -> None:
    """Leaving sends dm.user_left; the next message re-invites the human, as a DM, to the room."""
    human = await new_human()
    feed, contact = Feed(platform), _contact()
    room_id = await _joined_dm(bridge, platform, human, contact)
    await human.leave(room_id)
    left = await feed.expect("dm.user_left", room_id=room_id)
    assert left["remote_id"] == contact and left["dm"]["state"] == "active"

    human.invites.clear()
    again = await _sent(platform, human, contact, "are you still there?")
    assert again["room_id"] == room_id and again["room_created"] is False
    invite = await human.wait_invite(room_id)
    assert invite.content.get("is_direct") is True
    await human.join(room_id)
    await _lands(human, room_id, "are you still there?")


async def test_with_on_leave_new_room_the_next_message_opens_a_new_room(
    start_bridge: BridgeFactory, platform: Platform, new_human: NewHuman
) -> None:
    """With dm.on_leave: new_room, the message after a leave comes as an invite to a new room."""
    bridge = await start_bridge(**{"dm.on_leave": "new_room"})
    human = await new_human()
    feed, contact = Feed(platform), _contact()
    room_id = await _joined_dm(bridge, platform, human, contact)
    await human.leave(room_id)
    left = await feed.expect("dm.user_left", room_id=room_id)
    assert left["dm"]["state"] == "ended"

    again = await _sent(platform, human, contact, "new room please")
    assert again["room_id"] != room_id and again["room_created"] is True
    invite = await human.wait_invite(again["room_id"])
    assert invite.content.get("is_direct") is True
    await human.join(again["room_id"])
    await _lands(human, again["room_id"], "new room please")


# --- the user declines ------------------------------------------------------------------------

async def test_rejected_invite_stops_messages_and_new_invites(
    bridge: Bridge, platform: Platform, new_human: NewHuman
) -> None:
    """Rejecting the invite sends dm.declined; later sends get 403 and the human no invite."""
    human = await new_human()
    feed, contact = Feed(platform), _contact()
    first = await _sent(platform, human, contact, "hello")
    await human.wait_invite(first["room_id"])
    await human.reject(first["room_id"])
    declined = await feed.expect("dm.declined", room_id=first["room_id"])
    assert declined["dm"]["state"] == "declined" and declined["dm"]["reason"] == "invite_rejected"
    assert declined["remote_id"] == contact and declined["dm"]["event_id"]

    human.invites.clear()
    error = await _refused_as_declined(platform, human, contact)
    assert "rejected" in error, error
    marker = await _invite_marker(platform, human)
    assert set(human.invites) == {marker}, "the refused send must not invite the human"

    history = await bridge.stores.history.of_pair(_ghost(bridge, contact), human.user_id)
    assert ("declined", "invite_rejected", first["room_id"]) in [
        (t.state, t.reason, t.room_id) for t in history
    ]


@pytest.mark.parametrize(("action", "reason"), [("kick", "ghost_kicked"), ("ban", "ghost_banned")],
                         ids=["kick", "ban"])
async def test_kicking_or_banning_the_ghost_declines(
    bridge: Bridge, platform: Platform, new_human: NewHuman, action: str, reason: str
) -> None:
    """Removing the contact from the DM sends dm.declined; later sends get 403 DECLINED."""
    human = await new_human()
    feed, contact = Feed(platform), _contact()
    ghost_id = _ghost(bridge, contact)
    # The human's own DM room: in a room the ghost created (room v12), its creator can't be kicked.
    room_id = await _dm_from_matrix(human, ghost_id, feed)
    remove = human.kick if action == "kick" else human.ban
    await remove(room_id, ghost_id, "go away")
    declined = await feed.expect("dm.declined", room_id=room_id)
    assert declined["dm"]["reason"] == reason and declined["dm"]["state"] == "declined"
    assert "this contact" in await _refused_as_declined(platform, human, contact)


# --- a decline is lifted ----------------------------------------------------------------------

async def test_user_inviting_the_ghost_after_rejecting_lifts_the_decline(
    bridge: Bridge, platform: Platform, new_human: NewHuman
) -> None:
    """After a rejection the human starts a DM: the ghost joins and both ways work there."""
    human = await new_human()
    feed, contact = Feed(platform), _contact()
    ghost_id = _ghost(bridge, contact)
    first = await _sent(platform, human, contact, "hello")
    await human.wait_invite(first["room_id"])
    await human.reject(first["room_id"])
    await feed.expect("dm.declined", reason="invite_rejected")

    room_id = await _dm_from_matrix(human, ghost_id, feed)
    sent = await _sent(platform, human, contact, "glad you changed your mind")
    assert sent["room_id"] == room_id and sent["room_created"] is False
    await _lands(human, room_id, "glad you changed your mind")
    event_id = await human.say(room_id, "me too")
    message = await feed.expect("message", room_id=room_id, text="me too")
    assert message["message"]["event_id"] == event_id and message["remote_id"] == contact


async def test_admin_clearing_a_decline_lets_the_next_message_open_a_new_room(
    bridge: Bridge, platform: Platform, new_human: NewHuman
) -> None:
    """An admin clears the decline: dm.cleared, and the next message invites to a new room."""
    human = await new_human()
    feed, contact = Feed(platform), _contact()
    first = await _sent(platform, human, contact, "hello")
    await human.wait_invite(first["room_id"])
    await human.reject(first["room_id"])
    await feed.expect("dm.declined", reason="invite_rejected")

    await bridge.dms.clear_declined(NET, contact, human.user_id)
    cleared = await feed.expect("dm.cleared")
    assert cleared["remote_id"] == contact and cleared["user_id"] == human.user_id
    with pytest.raises(NotFound):
        await bridge.dms.clear_declined(NET, contact, human.user_id)
    with pytest.raises(NotFound):
        await bridge.dms.clear_declined(NET, _contact(), human.user_id)

    again = await _sent(platform, human, contact, "second chance")
    assert again["room_id"] != first["room_id"] and again["room_created"] is True
    await human.wait_invite(again["room_id"])


async def test_user_writing_in_an_old_dm_lifts_the_decline(
    bridge: Bridge, platform: Platform, new_human: NewHuman
) -> None:
    """The human writes in an older DM: dm.started, then the message; replies go there."""
    human = await new_human()
    feed, contact = Feed(platform), _contact()
    ghost_id = _ghost(bridge, contact)
    old_room = await _joined_dm(bridge, platform, human, contact)
    newer_room = await _dm_from_matrix(human, ghost_id, feed)  # the old room is replaced
    await human.kick(newer_room, ghost_id)
    await feed.expect("dm.declined", room_id=newer_room, reason="ghost_kicked")
    await _refused_as_declined(platform, human, contact)

    event_id = await human.say(old_room, "sorry, I'm back")
    started = await feed.expect("dm.started", room_id=old_room, reason="user_wrote")
    message = await feed.expect("message", room_id=old_room, text="sorry, I'm back")
    assert started["dm"]["event_id"] == event_id
    assert started["id"] < message["id"], "the platform hears of the DM before its message"
    again = await _sent(platform, human, contact, "welcome back")
    assert again["room_id"] == old_room and again["room_created"] is False
    await _lands(human, old_room, "welcome back")


# --- the room stops being a DM ----------------------------------------------------------------

async def test_a_third_person_joining_ends_the_dm(
    bridge: Bridge, platform: Platform, new_human: NewHuman
) -> None:
    """A friend joins: dm.ended; what is said there stays there; the next message opens a DM."""
    human, friend = await new_human(), await new_human()
    feed, contact = Feed(platform), _contact()
    room_id = await _joined_dm(bridge, platform, human, contact)
    await human.client.room_invite(room_id, friend.user_id)
    await friend.wait_invite(room_id)
    await friend.join(room_id)
    ended = await feed.expect("dm.ended", room_id=room_id)
    assert ended["dm"]["reason"] == "third_party_joined" and ended["dm"]["state"] == "ended"
    await human.say(room_id, "just between friends")

    fresh = await _sent(platform, human, contact, "a private word")
    assert fresh["room_id"] != room_id and fresh["room_created"] is True
    await human.wait_invite(fresh["room_id"])
    await human.join(fresh["room_id"])
    await human.say(fresh["room_id"], "for the contact")
    await feed.expect("message", room_id=fresh["room_id"], text="for the contact")
    assert "just between friends" not in feed.texts()


async def _shut_down(homeserver: Homeserver, room_id: str) -> None:
    """A server admin shuts the room down: Synapse makes each local member leave it."""
    localpart = f"admin-{uuid.uuid4().hex[:8]}"
    admin_id = await asyncio.to_thread(homeserver.synapse.register_user, localpart, PASSWORD,
                                       admin=True)
    client = AsyncClient(homeserver.url, admin_id)
    try:
        assert isinstance(await client.login(PASSWORD), LoginResponse)
        resp = await client.send(
            "DELETE", f"/_synapse/admin/v1/rooms/{quote(room_id, safe='')}",
            json.dumps({"block": False, "purge": False}),
            headers={"Authorization": f"Bearer {client.access_token}",
                     "Content-Type": "application/json"},
        )
        assert resp.status == 200, await resp.text()
    finally:
        await client.close()


async def test_ghost_removed_by_someone_else_ends_the_dm(
    bridge: Bridge, platform: Platform, new_human: NewHuman, homeserver: Homeserver
) -> None:
    """Someone else removes the ghost: dm.ended, and the next message opens a new DM."""
    human = await new_human()
    feed, contact = Feed(platform), _contact()
    room_id = await _joined_dm(bridge, platform, human, contact)
    await _shut_down(homeserver, room_id)
    await feed.expect("dm.ended", room_id=room_id, reason="ghost_removed")

    fresh = await _sent(platform, human, contact, "where did the room go?")
    assert fresh["room_id"] != room_id and fresh["room_created"] is True
    await human.wait_invite(fresh["room_id"])


# --- DMs started from Matrix ------------------------------------------------------------------

async def test_dm_started_from_matrix_works_both_ways(
    bridge: Bridge, platform: Platform, new_human: NewHuman
) -> None:
    """The human DMs a contact never seen before: the ghost joins, and both sides talk there."""
    human = await new_human()
    feed, contact = Feed(platform), _contact()
    room_id = await _dm_from_matrix(human, _ghost(bridge, contact), feed)
    await human.say(room_id, "hi from Matrix", html="hi from <b>Matrix</b>")
    message = await feed.expect("message", room_id=room_id)
    assert message["remote_id"] == contact
    assert message["message"]["text"] == "hi from Matrix"
    assert message["message"]["html"] == "hi from <b>Matrix</b>"
    assert message["message"]["sender"]["user_id"] == human.user_id

    reply = await _sent(platform, human, contact, "hi from Chat")
    assert reply["room_id"] == room_id and reply["room_created"] is False
    await _lands(human, room_id, "hi from Chat")


async def test_dm_started_from_matrix_replaces_the_earlier_dm(
    bridge: Bridge, platform: Platform, new_human: NewHuman
) -> None:
    """The pair had a DM; the human starts another: the newest room is where messages go."""
    human = await new_human()
    feed, contact = Feed(platform), _contact()
    old_room = await _joined_dm(bridge, platform, human, contact)
    new_room = await _dm_from_matrix(human, _ghost(bridge, contact), feed)
    assert new_room != old_room

    sent = await _sent(platform, human, contact, "in the new room")
    assert sent["room_id"] == new_room and sent["room_created"] is False
    await _lands(human, new_room, "in the new room")
    status, listed = await platform.call("GET", f"/networks/{NET}/dms", CHAT_TOKEN,
                                         params={"remote_id": contact})
    assert status == 200, listed
    assert [dm["room_id"] for dm in listed["dms"]] == [new_room]


# --- permissions ------------------------------------------------------------------------------

@pytest.mark.parametrize(("invites_from", "refusal"), [
    ([], "Chat contacts cannot be messaged first from Matrix."),
    (["@allowed:localhost", "otherserver.example"],
     "You are not permitted to start conversations with Chat contacts."),
], ids=["nobody", "others_only"])
async def test_permissions_refuse_sends_and_invites(
    start_bridge: BridgeFactory, platform: Platform, new_human: NewHuman, invites_from: list[str],
    refusal: str,
) -> None:
    """Outside send_to, sends get 403; outside invites_from, the ghost leaves saying why."""
    bridge = await start_bridge(networks={NET: {"permissions": {
        "send_to": ["@allowed:localhost", "otherserver.example"], "invites_from": invites_from,
    }}})
    human = await new_human()
    contact = _contact()
    status, body = await _send(platform, human, contact, "may I?")
    assert status == 403 and body["errcode"] == "DMBRIDGE_NOT_PERMITTED", body

    ghost_id = _ghost(bridge, contact)
    room_id = await human.create_dm(ghost_id)
    await human.wait_membership(room_id, ghost_id, "leave")
    assert await human.leave_reason(room_id, ghost_id) == refusal
    status, listed = await platform.call("GET", f"/networks/{NET}/dms", CHAT_TOKEN,
                                         params={"user_id": human.user_id})
    assert status == 200 and listed["dms"] == [], listed
    assert await bridge.stores.dms.get_current(ghost_id, human.user_id) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "refusal"), [
    ("not direct", "Chat contacts only take direct chats: invite them as a DM."),
    ("group", "Chat contacts only take one-to-one chats."),
], ids=["not_direct", "group"])
async def test_refused_invite_leaves_the_dm_as_it_was(
    bridge: Bridge, platform: Platform, new_human: NewHuman, kind: str, refusal: str
) -> None:
    """Inviting the contact to a non-DM room: the ghost leaves saying why; the DM goes on."""
    human, friend = await new_human(), await new_human()
    contact = _contact()
    ghost_id = _ghost(bridge, contact)
    dm_room = await _joined_dm(bridge, platform, human, contact)
    room_id = await human.create_room()
    if kind == "group":
        await human.client.room_invite(room_id, friend.user_id)
        await friend.wait_invite(room_id)
        await friend.join(room_id)
    await human.invite(room_id, ghost_id, is_direct=kind == "group")
    await human.wait_membership(room_id, ghost_id, "leave")
    assert await human.leave_reason(room_id, ghost_id) == refusal

    sent = await _sent(platform, human, contact, "still here")
    assert sent["room_id"] == dm_room and sent["room_created"] is False
    await _lands(human, dm_room, "still here")
