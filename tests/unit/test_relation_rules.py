"""Replies, edits and reactions from platforms: parsing targets, building content, and
finding the Matrix event a target names (on both database backends)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from mautrix.types import EventID, RoomID
from mautrix.util.async_db import Connection

from dmbridge import relations
from dmbridge.db import Stores, now_ms
from dmbridge.db.message import EDIT, MESSAGE, REACTION, MatrixMessage, SentMessage
from dmbridge.errors import BadRequest, BridgeError, Forbidden, InvalidParam, NotFound
from dmbridge.relations import (
    NotYours,
    Resolved,
    Target,
    TargetElsewhere,
    check_reaction_key,
    check_room,
    edit_content,
    reaction_content,
    reply_content,
)
from tests.unit.test_networks import make_network

REMOTE = "+15551234567"
OTHER_REMOTE = "+15557654321"
USER = "@alice:example.org"
OTHER_USER = "@bob:example.org"
ROOM = RoomID("!dm:example.org")
OLD_ROOM = RoomID("!old:example.org")
OTHER_ROOM = RoomID("!other:example.org")

# --- Target.parse ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ({"message_id": "m1"}, Target(message_id="m1")),
    ({"event_id": "$abc:example.org"}, Target(event_id="$abc:example.org")),
    ({"message_id": "x" * 255}, Target(message_id="x" * 255)),
    ({"message_id": " "}, Target(message_id=" ")),
])
def test_target_parse_valid(value: dict[str, Any], expected: Target) -> None:
    assert Target.parse({"reply_to": value, "text": "hi"}, "reply_to") == expected


def test_target_parse_absent_is_none() -> None:
    assert Target.parse({"text": "hi"}, "reply_to") is None
    assert Target.parse({"reply_to": None}, "reply_to") is None
    assert Target.parse({"target": {"message_id": "m1"}}, "reply_to") is None


@pytest.mark.parametrize("value", [
    "m1", 5, ["message_id", "m1"], {}, {"message_id": "m1", "event_id": "$e"},
    {"id": "m1"}, {"message_id": "m1", "extra": 1},
])
def test_target_parse_refuses_the_wrong_shape(value: Any) -> None:
    with pytest.raises(BadRequest) as info:
        Target.parse({"target": value}, "target")
    assert (info.value.status, info.value.errcode) == (400, "M_BAD_JSON")
    assert str(info.value).startswith("'target' must be {\"message_id\": ...}")


@pytest.mark.parametrize(("value", "field"), [
    ({"message_id": ""}, "message_id"),
    ({"event_id": ""}, "event_id"),
    ({"message_id": "x" * 256}, "message_id"),
    ({"event_id": "$" + "x" * 255}, "event_id"),
    ({"message_id": 12}, "message_id"),
    ({"event_id": None}, "event_id"),
])
def test_target_parse_refuses_bad_ids(value: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as info:
        Target.parse({"reply_to": value}, "reply_to")
    assert str(info.value) == f"'reply_to.{field}' must be a string of 1 to 255 characters"


def test_target_str() -> None:
    assert str(Target(message_id="m1")) == "message m1"
    assert str(Target(event_id="$e")) == "event $e"


# --- content --------------------------------------------------------------------------------


def test_reply_content() -> None:
    content = {"msgtype": "m.text", "body": "answer"}
    before = copy.deepcopy(content)
    assert reply_content(content, EventID("$target")) == {
        "msgtype": "m.text", "body": "answer",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$target"}},
    }
    assert content == before


def test_edit_content_with_html() -> None:
    new = {"msgtype": "m.text", "body": "new text", "format": "org.matrix.custom.html",
           "formatted_body": "new <b>text</b>"}
    before = copy.deepcopy(new)
    assert edit_content(new, EventID("$orig")) == {
        "msgtype": "m.text",
        "body": "* new text",
        "format": "org.matrix.custom.html",
        "formatted_body": "* new <b>text</b>",
        "m.new_content": before,
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$orig"},
    }
    assert new == before  # the new content itself has no '* ' and no relation


def test_edit_content_plain() -> None:
    new = {"msgtype": "m.notice", "body": "fixed"}
    content = edit_content(new, EventID("$orig"))
    assert content == {
        "msgtype": "m.notice", "body": "* fixed", "m.new_content": {"msgtype": "m.notice",
                                                                   "body": "fixed"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$orig"},
    }
    assert "formatted_body" not in content


def test_reaction_content() -> None:
    assert reaction_content("👍", EventID("$m")) == {
        "m.relates_to": {"rel_type": "m.annotation", "event_id": "$m", "key": "👍"}}


@pytest.mark.parametrize("key", ["👍", "👍🏽", "👩‍👩‍👧", "❤️", "+1", "x" * 64, "ok!", "é",
                                 "thumbs up"])
def test_reaction_key_accepted(key: str) -> None:
    assert check_reaction_key(key) == key


@pytest.mark.parametrize("key", [None, 5, "", "   ", "\t", ["👍"]])
def test_reaction_key_missing(key: object) -> None:
    with pytest.raises(BadRequest) as info:
        check_reaction_key(key)
    assert type(info.value) is BadRequest
    assert "'key' must be a non-empty string" in str(info.value)


@pytest.mark.parametrize("key", ["x" * 65, "a\nb", "\x00", "👍\x1b", "\x7f", "ok\x85",
                                 "\u200b", "\u200d\ufe0f"])
def test_reaction_key_too_long_or_unprintable(key: str) -> None:
    with pytest.raises(InvalidParam) as info:
        check_reaction_key(key)
    assert "at most 64 printable characters" in str(info.value)


# --- resolve --------------------------------------------------------------------------------


async def sent(stores: Stores, message_id: str, event_id: str, *, remote_id: str = REMOTE,
               network: str = "sms", room_id: RoomID = ROOM, kind: str = MESSAGE,
               target: str | None = None) -> None:
    await stores.messages.put(
        network, remote_id, message_id,
        SentMessage(room_id, EventID(event_id), kind, EventID(target) if target else None),
        now_ms(),
    )


async def received(stores: Stores, event_id: str, *, remote_id: str = REMOTE,
                   user_id: str = USER, network: str = "sms", room_id: RoomID = ROOM,
                   kind: str = MESSAGE, target: str | None = None, key: str | None = None
                   ) -> None:
    conn: Connection
    async with stores.db.acquire() as conn:
        await stores.matrix_messages.add(conn, MatrixMessage(
            EventID(event_id), room_id, network, remote_id, user_id, kind,
            EventID(target) if target else None, key), now_ms())


async def resolve(stores: Stores, target: Target, purpose: str = "reply to",
                  remote_id: str = REMOTE, user_id: str = USER) -> Resolved:
    return await relations.resolve(stores, "sms", remote_id, user_id, target, purpose=purpose)


@pytest.mark.parametrize("purpose", ["reply to", "edit", "react to"])
async def test_resolve_own_message(stores: Stores, purpose: str) -> None:
    await sent(stores, "m1", "$g1")
    await sent(stores, "m1", "$other", remote_id=OTHER_REMOTE)  # same ID, another sender
    assert await resolve(stores, Target(message_id="m1"), purpose) == Resolved(
        EventID("$g1"), ROOM, by_sender=True)


@pytest.mark.parametrize("purpose", ["reply to", "edit", "react to"])
async def test_resolve_unknown_message(stores: Stores, purpose: str) -> None:
    await sent(stores, "m1", "$g1")
    with pytest.raises(NotFound) as info:
        await resolve(stores, Target(message_id="m2"), purpose)
    assert type(info.value) is NotFound
    assert str(info.value) == (f"{REMOTE} sent no message m2 through the bridge; there is"
                               f" nothing to {purpose}")


async def test_resolve_another_senders_message(stores: Stores) -> None:
    await sent(stores, "theirs", "$o1", remote_id=OTHER_REMOTE)
    with pytest.raises(NotYours) as info:
        await resolve(stores, Target(message_id="theirs"), "edit")
    assert (info.value.status, info.value.errcode) == (403, "DMBRIDGE_NOT_YOUR_MESSAGE")
    assert isinstance(info.value, Forbidden)
    assert "only its sender can edit it" in str(info.value)
    for purpose in ("reply to", "react to"):
        with pytest.raises(NotFound) as not_found:
            await resolve(stores, Target(message_id="theirs"), purpose)
        assert type(not_found.value) is NotFound


async def test_resolve_message_sent_to_another_matrix_user(stores: Stores) -> None:
    ghost = make_network().ghost_user_id(REMOTE)
    for user_id, room_id in ((USER, ROOM), (OTHER_USER, OTHER_ROOM)):
        claim = f"claim-{user_id}"
        assert await stores.dms.claim(ghost, user_id, "sms", REMOTE, claim, "test", now_ms())
        assert await stores.dms.activate(ghost, user_id, claim, room_id, now_ms())
    await sent(stores, "to-bob", "$b1", room_id=OTHER_ROOM)
    for purpose in ("reply to", "edit", "react to"):
        with pytest.raises(NotFound) as info:
            await resolve(stores, Target(message_id="to-bob"), purpose)
        assert type(info.value) is NotFound
        assert f"was sent to {OTHER_USER}, not {USER}" in str(info.value)
    assert await resolve(stores, Target(message_id="to-bob"), user_id=OTHER_USER) == Resolved(
        EventID("$b1"), OTHER_ROOM, by_sender=True)


async def test_resolve_another_networks_message_is_not_found_even_to_edit(
    stores: Stores,
) -> None:
    await sent(stores, "elsewhere", "$c1", network="chat", remote_id="bob")
    with pytest.raises(NotFound):
        await resolve(stores, Target(message_id="elsewhere"), "edit")


@pytest.mark.parametrize("kind", [REACTION, EDIT])
@pytest.mark.parametrize("purpose", ["reply to", "edit", "react to"])
async def test_resolve_refuses_reactions_and_edits(stores: Stores, kind: str,
                                                   purpose: str) -> None:
    await sent(stores, "m1", "$g1")
    await sent(stores, "x1", "$gx", kind=kind, target="$g1")
    with pytest.raises(InvalidParam) as info:
        await resolve(stores, Target(message_id="x1"), purpose)
    assert str(info.value).startswith("message x1 is a")
    assert str(info.value).endswith(f" {kind}, not a message; cannot {purpose} it")


@pytest.mark.parametrize("purpose", ["reply to", "edit", "react to"])
async def test_resolve_refuses_a_deleted_message(stores: Stores, purpose: str) -> None:
    await sent(stores, "m1", "$g1")
    await sent(stores, "m2", "$g2")
    await stores.messages.mark_redacted("sms", REMOTE, "m1", now_ms())
    with pytest.raises(NotFound) as info:
        await resolve(stores, Target(message_id="m1"), purpose)
    assert "was deleted" in str(info.value)
    # Only that one.
    assert (await resolve(stores, Target(message_id="m2"), purpose)).event_id == "$g2"


async def test_resolve_matrix_users_message(stores: Stores) -> None:
    await received(stores, "$u1")
    for purpose in ("reply to", "react to"):
        assert await resolve(stores, Target(event_id="$u1"), purpose) == Resolved(
            EventID("$u1"), ROOM, by_sender=False)


@pytest.mark.parametrize(("where", "remote_id", "user_id", "network"), [
    ("another remote user's DM", OTHER_REMOTE, USER, "sms"),
    ("another Matrix user's DM", REMOTE, OTHER_USER, "sms"),
    ("another network's DM", REMOTE, USER, "chat"),
])
@pytest.mark.parametrize("purpose", ["reply to", "edit", "react to"])
async def test_resolve_event_of_another_dm_is_not_found(
    stores: Stores, where: str, remote_id: str, user_id: str, network: str, purpose: str
) -> None:
    await received(stores, "$u1", remote_id=remote_id, user_id=user_id, network=network,
                   room_id=OTHER_ROOM)
    with pytest.raises(NotFound) as info:
        await resolve(stores, Target(event_id="$u1"), purpose)
    assert type(info.value) is NotFound
    assert str(info.value) == (f"$u1 is not a message {REMOTE} received from {USER};"
                               f" there is nothing to {purpose}")


async def test_resolve_unknown_event_or_a_ghosts_event_is_not_found(stores: Stores) -> None:
    await sent(stores, "m1", "$g1")
    for event_id in ("$nobody", "$g1"):  # a platform's own message is named by message_id
        with pytest.raises(NotFound):
            await resolve(stores, Target(event_id=event_id))


async def test_resolve_matrix_users_message_cannot_be_edited(stores: Stores) -> None:
    await received(stores, "$u1")
    with pytest.raises(NotYours) as info:
        await resolve(stores, Target(event_id="$u1"), "edit")
    assert str(info.value) == f"$u1 was sent by {USER}; only its sender can edit it"


async def test_editing_a_matrix_users_message_named_as_a_message_id_is_not_yours(
    stores: Stores,
) -> None:
    """``edits`` takes a message ID; the event ID of the user's message there is a 403 too."""
    await received(stores, "$u1")
    await received(stores, "$u9", remote_id=OTHER_REMOTE, room_id=OTHER_ROOM)
    with pytest.raises(NotYours) as info:
        await resolve(stores, Target(message_id="$u1"), "edit")
    assert (info.value.status, info.value.errcode) == (403, "DMBRIDGE_NOT_YOUR_MESSAGE")
    assert str(info.value) == f"$u1 was sent by {USER}; only its sender can edit it"
    with pytest.raises(NotFound) as other:  # another DM's event: nothing said about it
        await resolve(stores, Target(message_id="$u9"), "edit")
    assert type(other.value) is NotFound
    with pytest.raises(NotFound) as reply:  # only an edit is refused as not yours
        await resolve(stores, Target(message_id="$u1"), "reply to")
    assert type(reply.value) is NotFound


@pytest.mark.parametrize("kind", [REACTION, EDIT])
async def test_resolve_matrix_users_reaction_or_edit_is_no_target(stores: Stores,
                                                                  kind: str) -> None:
    await received(stores, "$u1")
    await received(stores, "$u2", kind=kind, target="$u1",
                   key="👍" if kind == REACTION else None)
    with pytest.raises(InvalidParam) as info:
        await resolve(stores, Target(event_id="$u2"), "react to")
    assert str(info.value).startswith("event $u2 is a")
    assert str(info.value).endswith(f" {kind}, not a message; cannot react to it")


async def test_check_room(stores: Stores) -> None:
    await sent(stores, "old", "$g-old", room_id=OLD_ROOM)
    await received(stores, "$u-old", room_id=OLD_ROOM)
    await sent(stores, "new", "$g-new")
    check_room(await resolve(stores, Target(message_id="new")), ROOM, Target(message_id="new"),
               "reply to")  # same room: fine
    for target in (Target(message_id="old"), Target(event_id="$u-old")):
        resolved = await resolve(stores, target, "react to")
        assert resolved.room_id == OLD_ROOM
        with pytest.raises(TargetElsewhere) as info:
            check_room(resolved, ROOM, target, "react to")
        assert (info.value.status, info.value.errcode) == (409, "DMBRIDGE_TARGET_IN_OTHER_ROOM")
        assert isinstance(info.value, BridgeError)
        assert str(info.value) == (
            f"{target} is in an earlier DM room ({OLD_ROOM}); the pair's DM is now {ROOM},"
            " so it can no longer be reacted to")


@pytest.mark.parametrize("value", [{"message_id": "a\x00b"}, {"event_id": "$\ud800"}])
def test_a_target_the_databases_cannot_hold_is_refused(value: dict[str, str]) -> None:
    with pytest.raises(BadRequest) as info:
        Target.parse({"reply_to": value}, "reply_to")
    assert "reply_to." in str(info.value)
