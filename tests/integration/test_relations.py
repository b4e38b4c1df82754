"""Replies, edits, reactions and deletions both ways, as the human's client and the platform see
them; what the bridge refuses, and that the message map outlives a restart."""

from __future__ import annotations

import uuid
from typing import Any

from mautrix.types import EventID
from nio import MessageDirection, RoomMessagesResponse, RoomRedactResponse, RoomSendResponse

from dmbridge.bridge import Bridge
from tests.integration.conftest import BridgeFactory, Platform, accept_dm, wait_for
from tests.support.feed import Feed
from tests.support.matrix import Human
from tests.support.settings import CHAT_TOKEN

NET = "chat"
HTML = "org.matrix.custom.html"
# What a platform's reply, edit, reaction or deletion shows up as in the room.
VISIBLE = ("m.room.message", "m.reaction", "m.room.redaction")


def _contact() -> str:
    return f"r{uuid.uuid4().hex[:10]}"


def _ghost(bridge: Bridge, contact: str) -> str:
    return str(bridge.settings.networks.get(NET).ghost_user_id(contact))


async def _send(platform: Platform, contact: str, human: Human, message_id: str,
                **body: Any) -> dict[str, Any]:
    status, sent = await platform.send(NET, CHAT_TOKEN, message_id, sender=contact,
                                       recipient=human.user_id, **body)
    assert status == 200, sent
    return sent


async def _react(platform: Platform, contact: str, human: Human, reaction_id: str,
                 **body: Any) -> tuple[int, Any]:
    return await platform.call("PUT", f"/networks/{NET}/reactions/{reaction_id}", CHAT_TOKEN,
                               json={"sender": contact, "recipient": human.user_id, **body})


async def _delete(platform: Platform, message_id: str, **params: str) -> tuple[int, Any]:
    return await platform.call("DELETE", f"/networks/{NET}/messages/{message_id}", CHAT_TOKEN,
                               params=params)


def _refused(answer: tuple[int, Any], status: int, errcode: str) -> None:
    got_status, body = answer
    assert (got_status, body.get("errcode")) == (status, errcode), answer
    assert isinstance(body.get("error"), str) and body["error"], answer


async def _timeline(human: Human, room_id: str) -> list[dict[str, Any]]:
    """Every event of the room the human can see, oldest first, as raw event dicts."""
    resp = await human.client.room_messages(room_id, start=None,
                                            direction=MessageDirection.back, limit=300)
    assert isinstance(resp, RoomMessagesResponse), resp
    return [e.source for e in reversed(resp.chunk)]


async def _visible(human: Human, room_id: str) -> list[dict[str, Any]]:
    return [e for e in await _timeline(human, room_id) if e.get("type") in VISIBLE]


async def _wait_event(human: Human, room_id: str, event_id: str) -> dict[str, Any]:
    """The event as the human's client gets it, once the client can see it."""
    found: dict[str, Any] = {}

    async def seen() -> bool:
        for event in await _timeline(human, room_id):
            if event.get("event_id") == event_id:
                found.update(event)
                return True
        return False

    await wait_for(seen, what=f"{human.user_id} to see {event_id} in {room_id}")
    return found


async def _post(human: Human, room_id: str, type_: str, content: dict[str, Any]) -> str:
    """The human's client sends a raw event; its event ID."""
    resp = await human.client.room_send(room_id, type_, content)
    assert isinstance(resp, RoomSendResponse), resp
    return str(resp.event_id)


async def _redact(human: Human, room_id: str, event_id: str, reason: str | None = None) -> str:
    resp = await human.client.room_redact(room_id, event_id, reason)
    assert isinstance(resp, RoomRedactResponse), resp
    return str(resp.event_id)


def _redacts(event: dict[str, Any]) -> str | None:
    """What a redaction event removes (in its content from room version 11, else top level)."""
    return event.get("content", {}).get("redacts") or event.get("redacts")


async def _processed(bridge: Bridge, event_id: str) -> None:
    """Wait until the bridge has taken ``event_id`` from the homeserver's transactions."""
    async def taken() -> bool:
        return bool(await bridge.stores.db.fetchval(
            "SELECT COUNT(*) FROM processed_event WHERE event_id=$1", EventID(event_id)))

    await wait_for(taken, what=f"the bridge to process {event_id}")


# --- platform -> Matrix -----------------------------------------------------------------------

async def test_platform_replies_edits_reactions_and_deletions_reach_the_client(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    """Each relation lands as the event a Matrix client expects; resends land nothing new."""
    human = await new_human()
    contact = _contact()
    ghost = _ghost(bridge, contact)
    first = await _send(platform, contact, human, "m1", text="hello")
    room_id, hello = first["room_id"], first["event_id"]
    await accept_dm(human, room_id, bridge)
    feed = Feed(platform)
    mine = await human.say(room_id, "hi there")
    received = await feed.expect("message", room_id=room_id, text="hi there")
    assert received["message"]["event_id"] == mine

    reply = await _send(platform, contact, human, "m2", text="replying",
                        reply_to={"message_id": "m1"})
    answer = await _send(platform, contact, human, "m3", html="<b>to</b> you",
                         reply_to={"event_id": mine})
    edit = await _send(platform, contact, human, "m4", markdown="**hello** again", edits="m1")
    plain_edit = await _send(platform, contact, human, "m5", text="replying, edited",
                             edits="m2")
    status, thumbs = await _react(platform, contact, human, "r1", target={"message_id": "m1"},
                                  key="👍")
    assert status == 200, thumbs
    status, heart = await _react(platform, contact, human, "r2", target={"event_id": mine},
                                 key="❤️")
    assert status == 200, heart
    assert {reply["room_id"], answer["room_id"], edit["room_id"], plain_edit["room_id"],
            thumbs["room_id"], heart["room_id"]} == {room_id}
    assert not any(s["duplicate"] or s["room_created"]
                   for s in (reply, answer, edit, plain_edit, thumbs, heart))

    status, deleted = await _delete(platform, "m3", sender=contact, reason="wrong person")
    assert status == 200, deleted
    assert deleted["room_id"] == room_id and deleted["duplicate"] is False
    status, unreacted = await _delete(platform, "r2", sender=contact)
    assert status == 200, unreacted
    assert unreacted["duplicate"] is False

    # What the human's client shows.
    event = await _wait_event(human, room_id, reply["event_id"])
    assert event["sender"] == ghost and event["type"] == "m.room.message"
    assert event["content"] == {"msgtype": "m.text", "body": "replying",
                                "m.relates_to": {"m.in_reply_to": {"event_id": hello}}}
    event = await _wait_event(human, room_id, edit["event_id"])
    new_content = {"msgtype": "m.text", "body": "**hello** again", "format": HTML,
                   "formatted_body": "<p><strong>hello</strong> again</p>"}
    assert event["content"] == {
        "msgtype": "m.text", "body": "* **hello** again", "format": HTML,
        "formatted_body": "* <p><strong>hello</strong> again</p>",
        "m.new_content": new_content,
        "m.relates_to": {"rel_type": "m.replace", "event_id": hello},
    }
    event = await _wait_event(human, room_id, plain_edit["event_id"])
    assert event["content"] == {
        "msgtype": "m.text", "body": "* replying, edited",
        "m.new_content": {"msgtype": "m.text", "body": "replying, edited"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": reply["event_id"]},
    }
    event = await _wait_event(human, room_id, thumbs["event_id"])
    assert event["sender"] == ghost and event["type"] == "m.reaction"
    assert event["content"] == {"m.relates_to": {"rel_type": "m.annotation",
                                                 "event_id": hello, "key": "👍"}}

    redaction = await _wait_event(human, room_id, deleted["event_id"])
    assert redaction["type"] == "m.room.redaction" and redaction["sender"] == ghost
    assert _redacts(redaction) == answer["event_id"]
    assert redaction["content"].get("reason") == "wrong person"
    event = await _wait_event(human, room_id, answer["event_id"])
    assert event["content"] == {}
    assert event["unsigned"]["redacted_because"]["event_id"] == deleted["event_id"]
    redaction = await _wait_event(human, room_id, unreacted["event_id"])
    assert _redacts(redaction) == heart["event_id"] and redaction["sender"] == ghost
    event = await _wait_event(human, room_id, heart["event_id"])
    assert event["type"] == "m.reaction" and event["content"] == {}
    assert event["unsigned"]["redacted_because"]["event_id"] == unreacted["event_id"]

    # Resending any of them answers the first result, and lands nothing.
    again = await _send(platform, contact, human, "m2", text="replying",
                        reply_to={"message_id": "m1"})
    assert again == {**reply, "duplicate": True}
    again = await _send(platform, contact, human, "m4", markdown="**hello** again", edits="m1")
    assert again == {**edit, "duplicate": True}
    status, again = await _react(platform, contact, human, "r1", target={"message_id": "m1"},
                                 key="👍")
    assert (status, again) == (200, {**thumbs, "duplicate": True})
    status, again = await _delete(platform, "m3", sender=contact, reason="wrong person")
    assert (status, again) == (200, {**deleted, "duplicate": True})
    status, again = await _delete(platform, "r2", sender=contact)
    assert (status, again) == (200, {**unreacted, "duplicate": True})

    last = await _send(platform, contact, human, "m6", text="that is all")
    await _wait_event(human, room_id, last["event_id"])
    ids = [e["event_id"] for e in await _visible(human, room_id)]
    assert ids == [hello, mine, reply["event_id"], answer["event_id"], edit["event_id"],
                   plain_edit["event_id"], thumbs["event_id"], heart["event_id"],
                   deleted["event_id"], unreacted["event_id"], last["event_id"]]


# --- Matrix -> platform -----------------------------------------------------------------------

async def test_matrix_replies_edits_reactions_and_deletions_reach_the_platform(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    """The platform learns what each relation points at, by its own message IDs where it can."""
    human = await new_human()
    contact = _contact()
    ghost = _ghost(bridge, contact)
    first = await _send(platform, contact, human, "m1", text="hello")
    room_id, hello = first["room_id"], first["event_id"]
    await accept_dm(human, room_id, bridge)
    feed = Feed(platform)

    # A reply as older clients write it: a quote of the answered message in body and HTML.
    answer = await _post(human, room_id, "m.room.message", {
        "msgtype": "m.text", "body": f"> <{ghost}> hello\n\nanswer", "format": HTML,
        "formatted_body": (f'<mx-reply><blockquote><a href="https://matrix.to/#/{room_id}/'
                           f'{hello}">In reply to</a> <a href="https://matrix.to/#/{ghost}">'
                           f"{ghost}</a><br>hello</blockquote></mx-reply>answer"),
        "m.relates_to": {"m.in_reply_to": {"event_id": hello}},
    })
    message = (await feed.expect("message", room_id=room_id))["message"]
    assert message["event_id"] == answer
    assert (message["text"], message["html"]) == ("answer", "answer")
    assert message["reply_to"] == {"event_id": hello, "message_id": "m1", "kind": "message"}

    thumbs = await _post(human, room_id, "m.reaction", {
        "m.relates_to": {"rel_type": "m.annotation", "event_id": hello, "key": "👍"}})
    reaction = (await feed.expect("reaction", room_id=room_id))["reaction"]
    assert reaction["event_id"] == thumbs and reaction["key"] == "👍"
    assert reaction["target"] == {"event_id": hello, "message_id": "m1", "kind": "message"}
    assert isinstance(reaction["sent_at"], int)

    edit_id = await _post(human, room_id, "m.room.message", {
        "msgtype": "m.text", "body": "* answer!",
        "m.new_content": {"msgtype": "m.text", "body": "answer!", "format": HTML,
                          "formatted_body": "<b>answer</b>!"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": answer},
    })
    edit = (await feed.expect("edit", room_id=room_id))["edit"]
    assert edit["event_id"] == edit_id and isinstance(edit["edited_at"], int)
    assert edit["target"] == {"event_id": answer, "message_id": None, "kind": "message"}
    assert (edit["msgtype"], edit["text"], edit["html"]) == ("m.text", "answer!",
                                                             "<b>answer</b>!")

    # The human takes back the reaction, deletes their message, and deletes the contact's.
    second = await _send(platform, contact, human, "m2", text="delete me")
    gone_reaction = await _redact(human, room_id, thumbs, "changed my mind")
    gone_answer = await _redact(human, room_id, answer)
    gone_theirs = await _redact(human, room_id, second["event_id"], "spam")
    redactions = [(await feed.expect("redaction", room_id=room_id))["redaction"]
                  for _ in range(3)]
    assert [(r["event_id"], r["target"], r["reason"]) for r in redactions] == [
        (gone_reaction, {"event_id": thumbs, "message_id": None, "kind": "reaction"},
         "changed my mind"),
        (gone_answer, {"event_id": answer, "message_id": None, "kind": "message"}, None),
        (gone_theirs, {"event_id": second["event_id"], "message_id": "m2", "kind": "message"},
         "spam"),
    ]

    # Fallbacks: an edit of a message the platform never received comes as a message; a
    # reaction and a reply to an event the bridge never saw name it with kind "unknown".
    timeline = await _timeline(human, room_id)
    [joined] = [e["event_id"] for e in timeline if e["type"] == "m.room.member"
                and e["state_key"] == human.user_id and e["content"]["membership"] == "join"]
    # Only a message's sender may edit it: the human's "edit" of the contact's is not delivered
    # (the event list at the end shows nothing came of it).
    await _post(human, room_id, "m.room.message", {
        "msgtype": "m.text", "body": "* not yours",
        "m.new_content": {"msgtype": "m.text", "body": "not yours"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": hello},
    })
    fallback = await _post(human, room_id, "m.room.message", {
        "msgtype": "m.text", "body": "* hello, edited",
        "m.new_content": {"msgtype": "m.text", "body": "hello, edited"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": joined},
    })
    message = (await feed.expect("message", room_id=room_id))["message"]
    assert message["event_id"] == fallback
    assert (message["text"], message["html"], message["reply_to"]) == ("hello, edited", None,
                                                                       None)
    odd = await _post(human, room_id, "m.reaction", {
        "m.relates_to": {"rel_type": "m.annotation", "event_id": joined, "key": "🎉"}})
    reaction = (await feed.expect("reaction", room_id=room_id))["reaction"]
    assert reaction["event_id"] == odd and reaction["key"] == "🎉"
    assert reaction["target"] == {"event_id": joined, "message_id": None, "kind": "unknown"}
    stray = await _post(human, room_id, "m.room.message", {
        "msgtype": "m.text", "body": "about my joining",
        "m.relates_to": {"m.in_reply_to": {"event_id": joined}}})
    message = (await feed.expect("message", room_id=room_id))["message"]
    assert message["event_id"] == stray and message["text"] == "about my joining"
    assert message["reply_to"] == {"event_id": joined, "message_id": None, "kind": "unknown"}
    assert [e["type"] for e in feed.seen if e["type"] not in ("typing", "read")] == [
        "message", "reaction", "edit", "redaction", "redaction", "redaction", "message",
        "reaction", "message"]

    # What the human deleted of the platform's can no longer be a target, and a deletion of
    # the platform's reaction or edit names what it was.
    status, err = await platform.send(NET, CHAT_TOKEN, "m9", sender=contact,
                                      recipient=human.user_id, text="?",
                                      reply_to={"message_id": "m2"})
    assert (status, err["errcode"]) == (404, "M_NOT_FOUND"), err
    status, heart = await _react(platform, contact, human, "r9", target={"message_id": "m1"},
                                 key="❤️")
    assert status == 200, heart
    fixed = await _send(platform, contact, human, "e9", text="hello there", edits="m1")
    await _redact(human, room_id, heart["event_id"])
    await _redact(human, room_id, fixed["event_id"])
    redactions = [(await feed.expect("redaction", room_id=room_id))["redaction"]["target"]
                  for _ in range(2)]
    assert redactions == [
        {"event_id": heart["event_id"], "message_id": "r9", "kind": "reaction"},
        {"event_id": fixed["event_id"], "message_id": "e9", "kind": "edit"},
    ]


# --- refused ----------------------------------------------------------------------------------

async def test_refused_relations_answer_precisely_and_land_nothing(
    start_bridge: BridgeFactory, platform: Platform, new_human
) -> None:
    """Unknown, foreign, deleted, malformed or out-of-room targets: exact errors, no events."""
    bridge = await start_bridge(**{"dm.on_leave": "new_room"})
    human = await new_human()
    a, b = _contact(), _contact()
    feed = Feed(platform)
    a1 = await _send(platform, a, human, "a1", text="from A")
    room_a = a1["room_id"]
    await accept_dm(human, room_a, bridge)
    b1 = await _send(platform, b, human, "b1", text="from B")
    room_b = b1["room_id"]
    assert room_b != room_a
    await accept_dm(human, room_b, bridge)
    mine = await human.say(room_a, "hello A")
    await feed.expect("message", room_id=room_a, text="hello A")
    wave = await _post(human, room_a, "m.reaction", {
        "m.relates_to": {"rel_type": "m.annotation", "event_id": a1["event_id"], "key": "👋"}})
    await feed.expect("reaction", room_id=room_a)
    status, ar1 = await _react(platform, a, human, "ar1", target={"message_id": "a1"}, key="👋")
    assert status == 200, ar1

    async def send(contact: str, message_id: str, **body: Any) -> tuple[int, Any]:
        return await platform.send(NET, CHAT_TOKEN, message_id, sender=contact,
                                   recipient=human.user_id, **body)

    # Targets that do not exist, or that are not this sender's / this DM's.
    _refused(await send(a, "x1", text="?", reply_to={"message_id": "nope"}), 404, "M_NOT_FOUND")
    _refused(await send(a, "x1", text="?", reply_to={"event_id": "$nope"}), 404, "M_NOT_FOUND")
    _refused(await send(a, "x1", text="?", reply_to={"event_id": a1["event_id"]}), 404,
             "M_NOT_FOUND")  # the ghost's own message is not one the platform received
    _refused(await send(b, "x1", text="?", reply_to={"message_id": "a1"}), 404, "M_NOT_FOUND")
    # A's message to this human is not a target in A's DM with someone else.
    someone = await new_human()
    status, elsewhere_err = await platform.send(NET, CHAT_TOKEN, "o1", sender=a,
                                                recipient=someone.user_id, text="?",
                                                reply_to={"message_id": "a1"})
    _refused((status, elsewhere_err), 404, "M_NOT_FOUND")
    _refused(await send(b, "x1", text="?", reply_to={"event_id": mine}), 404, "M_NOT_FOUND")
    _refused(await send(b, "x1", text="mine now", edits="a1"), 403,
             "DMBRIDGE_NOT_YOUR_MESSAGE")
    _refused(await send(a, "x1", text="?", edits="nope"), 404, "M_NOT_FOUND")
    # The human's message, named by its event ID where a message ID belongs: not A's to edit.
    status, not_yours = await send(a, "x1", text="?", edits=mine)
    assert (status, not_yours) == (403, {
        "errcode": "DMBRIDGE_NOT_YOUR_MESSAGE",
        "error": f"{mine} was sent by {human.user_id}; only its sender can edit it"})
    _refused(await send(b, "x1", text="?", edits=mine), 404, "M_NOT_FOUND")  # not B's DM
    _refused(await send(a, "x1", text="?", edits="a1", reply_to={"event_id": mine}), 400,
             "M_INVALID_PARAM")
    _refused(await send(a, "x1", text="?", edits="a1", media="mxc://localhost/abc"), 400,
             "M_INVALID_PARAM")
    _refused(await send(a, "x1", text="?", edits={"message_id": "a1"}), 400, "M_BAD_JSON")
    _refused(await send(a, "x1", text="?", edits="ar1"), 400, "M_INVALID_PARAM")
    _refused(await send(a, "x1", text="?", reply_to={"message_id": "ar1"}), 400,
             "M_INVALID_PARAM")
    _refused(await send(a, "x1", text="?", reply_to={"event_id": wave}), 400,
             "M_INVALID_PARAM")  # the human's reaction is no message to answer
    _refused(await _react(platform, a, human, "x1", target={"event_id": wave}, key="👍"), 400,
             "M_INVALID_PARAM")
    # IDs are one space per sender: a reaction's ID is no message's, and the other way round.
    _refused(await send(a, "ar1", text="?"), 400, "M_INVALID_PARAM")
    _refused(await _react(platform, a, human, "a1", target={"message_id": "a1"}, key="👍"),
             400, "M_INVALID_PARAM")

    # Malformed reply_to.
    for bad in ("a1", {"message_id": "a1", "event_id": mine}, {}, {"message_id": ""},
                {"message_id": 5}, {"room_id": room_a}, ["a1"]):
        _refused(await send(a, "x1", text="?", reply_to=bad), 400, "M_BAD_JSON")

    # Reactions.
    _refused(await _react(platform, a, human, "x1", target={"message_id": "a1"}, key=""), 400,
             "M_BAD_JSON")
    _refused(await _react(platform, a, human, "x1", target={"message_id": "a1"}), 400,
             "M_BAD_JSON")
    for invisible in ("a\x7fb", "\u200b", " \u200d "):
        _refused(await _react(platform, a, human, "x1", target={"message_id": "a1"},
                              key=invisible), 400, "M_INVALID_PARAM")
    _refused(await _react(platform, a, human, "x1", target={"message_id": "a1"}, key="x" * 65),
             400, "M_INVALID_PARAM")
    _refused(await _react(platform, a, human, "x1", target={"message_id": "a1"}, key="a\nb"),
             400, "M_INVALID_PARAM")
    _refused(await _react(platform, a, human, "x1", key="👍"), 400, "M_BAD_JSON")
    _refused(await _react(platform, a, human, "x1", target="a1", key="👍"), 400, "M_BAD_JSON")
    _refused(await _react(platform, a, human, "x1", target={"message_id": "nope"}, key="👍"),
             404, "M_NOT_FOUND")
    _refused(await _react(platform, b, human, "x1", target={"message_id": "a1"}, key="👍"),
             404, "M_NOT_FOUND")
    _refused(await _react(platform, b, human, "x1", target={"event_id": mine}, key="👍"),
             404, "M_NOT_FOUND")
    _refused(await _react(platform, _contact(), human, "x1", target={"message_id": "a1"},
                          key="👍"), 404, "M_NOT_FOUND")  # no DM at all

    # Deletions.
    _refused(await _delete(platform, "a1", sender=b), 403, "DMBRIDGE_NOT_YOUR_MESSAGE")
    _refused(await _delete(platform, "nope", sender=a), 404, "M_NOT_FOUND")
    _refused(await _delete(platform, "a1"), 400, "M_BAD_JSON")

    # A deleted message can no longer be replied to, edited or reacted to.
    a2 = await _send(platform, a, human, "a2", text="soon gone")
    status, gone = await _delete(platform, "a2", sender=a)
    assert status == 200, gone
    _refused(await send(a, "x1", text="?", reply_to={"message_id": "a2"}), 404, "M_NOT_FOUND")
    _refused(await send(a, "x1", text="?", edits="a2"), 404, "M_NOT_FOUND")
    _refused(await _react(platform, a, human, "x1", target={"message_id": "a2"}, key="👍"),
             404, "M_NOT_FOUND")

    # None of it landed, and "x1" was never taken: it is still free for a real message.
    last_a = await _send(platform, a, human, "x1", text="all good")
    assert last_a["duplicate"] is False
    last_b = await _send(platform, b, human, "x1", text="all good here too")
    await _wait_event(human, room_a, last_a["event_id"])
    await _wait_event(human, room_b, last_b["event_id"])
    assert [e["event_id"] for e in await _visible(human, room_a)] == [
        a1["event_id"], mine, wave, ar1["event_id"], a2["event_id"], gone["event_id"],
        last_a["event_id"]]
    assert [e["event_id"] for e in await _visible(human, room_b)] == [
        b1["event_id"], last_b["event_id"]]

    # The human leaves; A's next message opens a new room. What is in the old one stays there.
    await human.leave(room_a)
    await feed.expect("dm.user_left", room_id=room_a)
    # Refused before any room is opened: the next message is the one that opens it.
    _refused(await send(a, "z0", text="?", reply_to={"message_id": "a1"}), 409,
             "DMBRIDGE_TARGET_IN_OTHER_ROOM")
    a3 = await _send(platform, a, human, "a3", text="new room please")
    room_new = a3["room_id"]
    assert room_new != room_a and a3["room_created"] is True
    await accept_dm(human, room_new, bridge)
    elsewhere = "DMBRIDGE_TARGET_IN_OTHER_ROOM"
    _refused(await send(a, "y1", text="?", reply_to={"message_id": "a1"}), 409, elsewhere)
    _refused(await send(a, "y1", text="?", reply_to={"event_id": mine}), 409, elsewhere)
    _refused(await send(a, "y1", text="?", edits="a1"), 409, elsewhere)
    _refused(await _react(platform, a, human, "y1", target={"message_id": "a1"}, key="👍"),
             409, elsewhere)
    _refused(await _react(platform, a, human, "y1", target={"event_id": mine}, key="👍"),
             409, elsewhere)
    last_new = await _send(platform, a, human, "y1", text="still here")
    assert last_new["room_id"] == room_new and last_new["duplicate"] is False
    await _wait_event(human, room_new, last_new["event_id"])
    assert [e["event_id"] for e in await _visible(human, room_new)] == [
        a3["event_id"], last_new["event_id"]]


# --- restart ----------------------------------------------------------------------------------

async def test_the_message_map_outlives_a_restart(
    start_bridge: BridgeFactory, platform: Platform, new_human
) -> None:
    """After a restart, replies, edits and reactions still find their targets; resends are
    still duplicates; the platform still learns its own IDs for the human's relations."""
    bridge = await start_bridge()
    human = await new_human()
    contact = _contact()
    first = await _send(platform, contact, human, "m1", text="before the restart")
    room_id, before = first["room_id"], first["event_id"]
    await accept_dm(human, room_id, bridge)
    feed = Feed(platform)
    mine = await human.say(room_id, "me too, before")
    await feed.expect("message", room_id=room_id, text="me too, before")
    await _processed(bridge, mine)
    await bridge.stop()

    await start_bridge()
    again = await _send(platform, contact, human, "m1", text="before the restart")
    assert again == {**first, "room_created": False, "duplicate": True}
    reply = await _send(platform, contact, human, "m2", text="still replying",
                        reply_to={"message_id": "m1"})
    answer = await _send(platform, contact, human, "m3", text="to you too",
                         reply_to={"event_id": mine})
    edit = await _send(platform, contact, human, "m4", text="after the restart", edits="m1")
    status, thumbs = await _react(platform, contact, human, "r1", target={"message_id": "m1"},
                                  key="👍")
    assert status == 200, thumbs
    assert reply["room_id"] == answer["room_id"] == edit["room_id"] == room_id

    event = await _wait_event(human, room_id, reply["event_id"])
    assert event["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": before}}
    event = await _wait_event(human, room_id, answer["event_id"])
    assert event["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": mine}}
    event = await _wait_event(human, room_id, edit["event_id"])
    assert event["content"]["m.relates_to"] == {"rel_type": "m.replace", "event_id": before}
    assert event["content"]["m.new_content"] == {"msgtype": "m.text",
                                                 "body": "after the restart"}
    event = await _wait_event(human, room_id, thumbs["event_id"])
    assert event["content"]["m.relates_to"] == {"rel_type": "m.annotation",
                                                "event_id": before, "key": "👍"}

    # The human's side: the platform still gets its own ID for a message from before.
    heart = await _post(human, room_id, "m.reaction", {
        "m.relates_to": {"rel_type": "m.annotation", "event_id": before, "key": "❤️"}})
    reaction = (await feed.expect("reaction", room_id=room_id))["reaction"]
    assert reaction["event_id"] == heart
    assert reaction["target"] == {"event_id": before, "message_id": "m1", "kind": "message"}
    edited = await _post(human, room_id, "m.room.message", {
        "msgtype": "m.text", "body": "* me too, after",
        "m.new_content": {"msgtype": "m.text", "body": "me too, after"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": mine}})
    edit_event = (await feed.expect("edit", room_id=room_id))["edit"]
    assert edit_event["event_id"] == edited and edit_event["text"] == "me too, after"
    assert edit_event["target"] == {"event_id": mine, "message_id": None, "kind": "message"}

    ids = [e["event_id"] for e in await _visible(human, room_id)]
    assert ids == [before, mine, reply["event_id"], answer["event_id"], edit["event_id"],
                   thumbs["event_id"], heart, edited]
