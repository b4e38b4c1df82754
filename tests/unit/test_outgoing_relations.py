"""What platforms receive for a Matrix user's replies, reactions, edits, deletions and media.

Runs MatrixHandler.handle_transaction on a real database (both backends) with hand-made events,
like test_lifecycle_rules.py; no homeserver is involved.
"""

from __future__ import annotations

from typing import Any

import pytest
from mautrix.types import EventID, RoomID
from mautrix.util.async_db import Connection

from dmbridge import relations
from dmbridge.db import Stores, now_ms
from dmbridge.db.message import EDIT, MESSAGE, REACTION, MatrixMessage, SentMessage
from dmbridge.errors import NotFound
from dmbridge.matrix import MatrixHandler
from dmbridge.relations import Target
from tests.unit.test_lifecycle_rules import (
    GHOST,
    REMOTE,
    ROOM,
    STRANGER,
    USER,
    Recorder,
    make_handler,
    message,
    new_event_id,
    open_dm,
    outbox,
    send,
)

HTML = "org.matrix.custom.html"
TS = 1_700_000_000_123
GHOST_EVENT = "$ghost-message"


@pytest.fixture
async def dm(stores: Stores) -> tuple[MatrixHandler, Recorder]:
    """An open DM in which the platform's user already sent one message (``m1``)."""
    handler, recorder = make_handler(stores)
    await open_dm(stores)
    await stores.messages.put("sms", REMOTE, "m1", SentMessage(RoomID(ROOM),
                                                               EventID(GHOST_EVENT)), now_ms())
    return handler, recorder


def envelope(item: dict[str, Any], type_: str, event_id: str) -> dict[str, Any]:
    return {
        "id": item["id"], "type": type_, "idempotency_key": event_id, "network": "sms",
        "remote_id": REMOTE, "ghost_id": GHOST, "user_id": USER, "room_id": ROOM,
        "queued_at": item["queued_at"],
    }


def event(type_: str, content: dict[str, Any], *, sender: str = USER, room_id: str = ROOM,
          **top: Any) -> dict[str, Any]:
    return {"type": type_, "room_id": room_id, "sender": sender, "event_id": new_event_id(),
            "origin_server_ts": TS, "content": content, **top}


def reaction(target: str, key: str = "👍", **kw: Any) -> dict[str, Any]:
    return event("m.reaction", {"m.relates_to": {"rel_type": "m.annotation",
                                                 "event_id": target, "key": key}}, **kw)


def edit(target: str, body: str, **new: Any) -> dict[str, Any]:
    new_content = {"msgtype": "m.text", "body": body, **new}
    raw = message(body=f"* {body}")
    raw["content"].update({"m.new_content": new_content,
                           "m.relates_to": {"rel_type": "m.replace", "event_id": target}})
    return raw


def reply(target: str, body: str, **content: Any) -> dict[str, Any]:
    raw = message(body=body, **content)
    raw["content"]["m.relates_to"] = {"m.in_reply_to": {"event_id": target}}
    return raw


def redaction(target: str, *, in_content: bool = True, reason: str | None = None
              ) -> dict[str, Any]:
    content: dict[str, Any] = {"redacts": target} if in_content else {}
    if reason is not None:
        content["reason"] = reason
    return event("m.room.redaction", content, **({} if in_content else {"redacts": target}))


def message_body(raw: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "event_id": raw["event_id"],
        "sender": {"user_id": USER, "displayname": "Alice"},
        "recipient": REMOTE,
        "msgtype": "m.text",
        "text": raw["content"]["body"],
        "html": None,
        "media": None,
        "reply_to": None,
        "thread_root": None,
        "sent_at": TS,
        **fields,
    }


def mapped(raw: dict[str, Any], kind: str = MESSAGE, target: str | None = None,
           key: str | None = None) -> MatrixMessage:
    return MatrixMessage(EventID(raw["event_id"]), RoomID(ROOM), "sms", REMOTE, USER, kind,
                         EventID(target) if target else None, key)


async def last(stores: Stores) -> dict[str, Any]:
    return (await outbox(stores))[-1]


# --- replies --------------------------------------------------------------------------------


async def test_reply_to_a_ghost_message_names_the_platforms_id(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, rec = dm
    raw = reply(GHOST_EVENT, "my answer")
    await send(h, raw)
    [item] = await outbox(stores)
    assert item == {
        **envelope(item, "message", raw["event_id"]),
        "message": message_body(raw, reply_to={"event_id": GHOST_EVENT, "message_id": "m1",
                                               "kind": "message"}),
    }
    assert await stores.matrix_messages.get(raw["event_id"]) == mapped(raw)
    assert rec.queued == [{"sms"}]


async def test_reply_fallback_is_stripped_from_text_and_html(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = dm
    raw = reply(
        GHOST_EVENT, f"> <{GHOST}> how are you?\n> second line\n\nfine, *thanks*",
        format=HTML,
        formatted_body=(f'<mx-reply><blockquote><a href="https://matrix.to/#/{ROOM}/'
                        f'{GHOST_EVENT}">In reply to</a> <a href="https://matrix.to/#/{GHOST}">'
                        f"{GHOST}</a><br>how are you?</blockquote></mx-reply>"
                        "fine, <em>thanks</em>"),
    )
    await send(h, raw)
    body = (await last(stores))["message"]
    assert (body["text"], body["html"]) == ("fine, *thanks*", "fine, <em>thanks</em>")
    assert body["reply_to"] == {"event_id": GHOST_EVENT, "message_id": "m1", "kind": "message"}


def in_thread(root: object, body: str, falling_back: bool, answered: str) -> dict[str, Any]:
    raw = message(body=body)
    raw["content"]["m.relates_to"] = {"rel_type": "m.thread", "event_id": root,
                                      "is_falling_back": falling_back,
                                      "m.in_reply_to": {"event_id": answered}}
    return raw


async def test_a_thread_message_names_its_root_and_only_a_real_reply(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = dm
    first = message(body="mine")
    await send(h, first,
               in_thread(GHOST_EVENT, "in the platform's thread", True, GHOST_EVENT),
               in_thread(GHOST_EVENT, "answering mine", False, first["event_id"]),
               in_thread(first["event_id"], "in my own thread", True, first["event_id"]),
               in_thread("$never-seen", "in a thread the bridge never saw", True, "$never-seen"),
               in_thread(42, "a root that is no event ID", True, GHOST_EVENT))
    _, fallback, answer, own, unknown, bogus = [e["message"] for e in await outbox(stores)]
    platforms = {"event_id": GHOST_EVENT, "message_id": "m1", "kind": "message"}
    assert (fallback["thread_root"], fallback["reply_to"]) == (platforms, None)
    assert (answer["thread_root"], answer["reply_to"]) == (platforms, {
        "event_id": first["event_id"], "message_id": None, "kind": "message"})
    assert own["thread_root"] == {"event_id": first["event_id"], "message_id": None,
                                  "kind": "message"}
    assert unknown["thread_root"] == {"event_id": "$never-seen", "message_id": None,
                                      "kind": "unknown"}
    # Not a thread the platform can name: a plain reply to what it answers, as before.
    assert (bogus["thread_root"], bogus["reply_to"]) == (None, platforms)


async def test_quote_lines_stay_in_a_message_that_is_no_reply(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = dm
    text = "> <@someone:example.org> a quote\n\nand my words"
    await send(h, message(body=text))
    body = (await last(stores))["message"]
    assert (body["text"], body["reply_to"]) == (text, None)


async def test_reply_to_the_users_own_or_an_unknown_message(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = dm
    first = message(body="first")
    answer = reply(first["event_id"], "about my first message")
    stray = reply("$never-seen", "> <@x:example.org> old\nanswer without a blank line")
    await send(h, first, answer, stray)
    _, answered, unknown = await outbox(stores)
    assert answered["message"]["reply_to"] == {"event_id": first["event_id"], "message_id": None,
                                               "kind": "message"}
    assert unknown["message"]["reply_to"] == {"event_id": "$never-seen", "message_id": None,
                                              "kind": "unknown"}
    assert unknown["message"]["text"] == "answer without a blank line"


# --- reactions ------------------------------------------------------------------------------


async def test_reaction_to_a_ghost_message(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, rec = dm
    raw = reaction(GHOST_EVENT, "🎉")
    await send(h, raw)
    [item] = await outbox(stores)
    assert item == {
        **envelope(item, "reaction", raw["event_id"]),
        "reaction": {"event_id": raw["event_id"], "key": "🎉",
                     "target": {"event_id": GHOST_EVENT, "message_id": "m1", "kind": "message"},
                     "sent_at": TS},
    }
    assert await stores.matrix_messages.get(raw["event_id"]) == mapped(
        raw, REACTION, GHOST_EVENT, "🎉")
    assert rec.queued == [{"sms"}]


async def test_reaction_to_the_users_own_and_to_an_unknown_message(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = dm
    first = message()
    own, unknown = reaction(first["event_id"]), reaction("$never-seen", "❤️")
    await send(h, first, own, unknown)
    _, to_own, to_unknown = await outbox(stores)
    assert to_own["reaction"]["target"] == {"event_id": first["event_id"], "message_id": None,
                                            "kind": "message"}
    assert to_unknown["reaction"]["target"] == {"event_id": "$never-seen", "message_id": None,
                                                "kind": "unknown"}
    assert await stores.matrix_messages.get(unknown["event_id"]) == mapped(
        unknown, REACTION, "$never-seen", "❤️")


@pytest.mark.parametrize("relates", [
    {"rel_type": "m.reference", "event_id": GHOST_EVENT, "key": "👍"},
    {"rel_type": "m.annotation", "key": "👍"},
    {"rel_type": "m.annotation", "event_id": GHOST_EVENT},
    {"rel_type": "m.annotation", "event_id": GHOST_EVENT, "key": 1},
    "not a mapping",
], ids=["wrong rel_type", "no target", "no key", "key not a string", "relates not a dict"])
async def test_malformed_reactions_are_not_delivered(
    stores: Stores, dm: tuple[MatrixHandler, Recorder], relates: Any
) -> None:
    h, rec = dm
    raw = event("m.reaction", {"m.relates_to": relates})
    await send(h, raw)
    assert await outbox(stores) == []
    assert await stores.matrix_messages.get(raw["event_id"]) is None
    assert rec.queued == []


@pytest.mark.parametrize("case", ["from the ghost", "from a stranger", "in another room"])
async def test_reactions_not_from_the_dms_user_are_not_delivered(
    stores: Stores, dm: tuple[MatrixHandler, Recorder], case: str
) -> None:
    h, rec = dm
    if case == "from the ghost":
        raw = reaction(GHOST_EVENT, sender=GHOST)
    elif case == "from a stranger":
        raw = reaction(GHOST_EVENT, sender=STRANGER)
    else:
        raw = reaction(GHOST_EVENT, room_id="!group:example.org")
    await send(h, raw)
    assert await outbox(stores) == []
    assert await stores.matrix_messages.get(raw["event_id"]) is None
    assert rec.queued == []


# --- edits ----------------------------------------------------------------------------------


async def test_edit_of_the_users_own_message(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = dm
    original = message(body="helo")
    await send(h, original)
    raw = edit(original["event_id"], "hello **you**", format=HTML,
               formatted_body="hello <strong>you</strong><script>x()</script>")
    await send(h, raw)
    _, item = await outbox(stores)
    assert item == {
        **envelope(item, "edit", raw["event_id"]),
        "edit": {"event_id": raw["event_id"],
                 "target": {"event_id": original["event_id"], "message_id": None,
                            "kind": "message"},
                 "msgtype": "m.text", "text": "hello **you**",
                 "html": "hello <strong>you</strong>", "edited_at": TS},
    }
    assert await stores.matrix_messages.get(raw["event_id"]) == mapped(
        raw, EDIT, original["event_id"])


async def test_an_edit_of_the_contacts_message_is_not_delivered(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    """Only a message's sender may edit it: the user's m.replace of the ghost's goes nowhere."""
    h, _ = dm
    raw = edit(GHOST_EVENT, "rewritten")
    await send(h, raw)
    assert await outbox(stores) == []
    assert await stores.matrix_messages.get(raw["event_id"]) is None


@pytest.mark.parametrize("case", ["unknown", "another DM's"])
async def test_edit_of_a_message_the_platform_never_had_is_a_message(
    stores: Stores, dm: tuple[MatrixHandler, Recorder], case: str
) -> None:
    h, _ = dm
    target = {"unknown": "$never-seen", "another DM's": "$elsewhere"}[case]
    if case == "another DM's":
        conn: Connection
        async with stores.db.acquire() as conn:
            await stores.matrix_messages.add(conn, MatrixMessage(
                EventID("$elsewhere"), RoomID("!other:example.org"), "sms", "+15557654321",
                USER, MESSAGE), now_ms())
    raw = edit(target, "the new text", msgtype="m.notice")
    await send(h, raw)
    [item] = await outbox(stores)
    assert item == {
        **envelope(item, "message", raw["event_id"]),
        "message": message_body(raw, msgtype="m.notice", text="the new text"),
    }
    assert await stores.matrix_messages.get(raw["event_id"]) == mapped(raw)


async def test_an_edit_without_new_content_is_a_plain_message(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = dm
    original = message()
    await send(h, original)
    raw = message(body="* fixed")
    raw["content"]["m.relates_to"] = {"rel_type": "m.replace", "event_id": original["event_id"]}
    await send(h, raw)
    item = await last(stores)
    assert (item["type"], item["message"]["text"]) == ("message", "* fixed")


# --- redactions -----------------------------------------------------------------------------


@pytest.mark.parametrize("in_content", [True, False], ids=["content.redacts", "top-level"])
async def test_redaction_of_the_users_message(
    stores: Stores, dm: tuple[MatrixHandler, Recorder], in_content: bool
) -> None:
    h, rec = dm
    original = message()
    await send(h, original)
    raw = redaction(original["event_id"], in_content=in_content, reason="typo")
    await send(h, raw)
    _, item = await outbox(stores)
    assert item == {
        **envelope(item, "redaction", raw["event_id"]),
        "redaction": {"event_id": raw["event_id"],
                      "target": {"event_id": original["event_id"], "message_id": None,
                                 "kind": "message"},
                      "reason": "typo", "sent_at": TS},
    }
    assert await stores.matrix_messages.get(raw["event_id"]) is None
    assert rec.queued == [{"sms"}, {"sms"}]


@pytest.mark.parametrize("in_content", [True, False], ids=["content.redacts", "top-level"])
async def test_redaction_of_the_users_reaction_and_edit(
    stores: Stores, dm: tuple[MatrixHandler, Recorder], in_content: bool
) -> None:
    h, _ = dm
    original = message()
    liked = reaction(GHOST_EVENT)
    changed = edit(original["event_id"], "changed")
    await send(h, original, liked, changed)
    unlike = redaction(liked["event_id"], in_content=in_content)
    unchange = redaction(changed["event_id"], in_content=in_content, reason="never mind")
    await send(h, unlike, unchange)
    *_, took_back, deleted_edit = await outbox(stores)
    assert took_back["redaction"] == {
        "event_id": unlike["event_id"],
        "target": {"event_id": liked["event_id"], "message_id": None, "kind": "reaction"},
        "reason": None, "sent_at": TS,
    }
    assert deleted_edit["redaction"]["target"] == {
        "event_id": changed["event_id"], "message_id": None, "kind": "edit"}
    assert deleted_edit["redaction"]["reason"] == "never mind"


@pytest.mark.parametrize("in_content", [True, False], ids=["content.redacts", "top-level"])
async def test_redaction_of_a_ghost_message(
    stores: Stores, dm: tuple[MatrixHandler, Recorder], in_content: bool
) -> None:
    h, _ = dm
    raw = redaction(GHOST_EVENT, in_content=in_content)
    await send(h, raw)
    [item] = await outbox(stores)
    assert item == {
        **envelope(item, "redaction", raw["event_id"]),
        "redaction": {"event_id": raw["event_id"],
                      "target": {"event_id": GHOST_EVENT, "message_id": "m1", "kind": "message"},
                      "reason": None, "sent_at": TS},
    }


async def test_redaction_of_a_ghost_reaction_names_its_kind(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = dm
    await stores.messages.put("sms", REMOTE, "r1", SentMessage(
        RoomID(ROOM), EventID("$ghost-reaction"), REACTION, EventID(GHOST_EVENT)), now_ms())
    raw = redaction("$ghost-reaction")
    await send(h, raw)
    [item] = await outbox(stores)
    assert item["redaction"]["target"] == {"event_id": "$ghost-reaction", "message_id": "r1",
                                           "kind": "reaction"}


async def test_what_the_user_deleted_is_no_target_for_the_platform(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = dm
    mine, kept = message(body="mine"), message(body="kept")
    await send(h, mine, kept)
    found = await relations.resolve(stores, "sms", REMOTE, USER,
                                    Target(event_id=mine["event_id"]), purpose="reply to")
    assert found.event_id == mine["event_id"]
    deletions = [redaction(mine["event_id"]), redaction(GHOST_EVENT, in_content=False)]
    await send(h, *deletions)
    for target in (Target(event_id=mine["event_id"]), Target(message_id="m1")):
        for purpose in ("reply to", "react to"):
            with pytest.raises(NotFound) as info:
                await relations.resolve(stores, "sms", REMOTE, USER, target, purpose=purpose)
            assert "was deleted" in str(info.value)
    # Only those two.
    assert (await relations.resolve(stores, "sms", REMOTE, USER, Target(event_id=kept[
        "event_id"]), purpose="react to")).event_id == kept["event_id"]
    # A resent redaction queues nothing more.
    await send(h, *deletions)
    assert [i["type"] for i in await outbox(stores)] == [
        "message", "message", "redaction", "redaction"]


@pytest.mark.parametrize("raw", [
    redaction("$never-seen"),
    redaction("$never-seen", in_content=False),
    event("m.room.redaction", {}),
    event("m.room.redaction", {"redacts": 5}),
], ids=["unknown in content", "unknown top-level", "no target", "target not a string"])
async def test_redaction_of_something_the_platform_never_had_is_not_delivered(
    stores: Stores, dm: tuple[MatrixHandler, Recorder], raw: dict[str, Any]
) -> None:
    h, rec = dm
    await send(h, raw)
    assert await outbox(stores) == []
    assert rec.queued == []


async def test_redaction_of_another_dms_message_is_not_delivered(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = dm
    await stores.messages.put("sms", "+15557654321", "m1", SentMessage(
        RoomID("!other:example.org"), EventID("$their-ghost")), now_ms())
    conn: Connection
    async with stores.db.acquire() as conn:
        await stores.matrix_messages.add(conn, MatrixMessage(
            EventID("$elsewhere"), RoomID("!other:example.org"), "sms", "+15557654321", USER,
            MESSAGE), now_ms())
    await send(h, redaction("$their-ghost"), redaction("$elsewhere"))
    assert await outbox(stores) == []


# --- media ----------------------------------------------------------------------------------


def media_message(msgtype: str = "m.image", **content: Any) -> dict[str, Any]:
    raw = message(**content)
    raw["content"]["msgtype"] = msgtype
    return raw


async def test_image_gets_a_media_block_without_a_link_yet(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = dm
    raw = media_message(body="cat.png", filename="cat.png", url="mxc://example.org/cAt_1",
                        info={"mimetype": "image/png", "size": 1234, "w": 3, "h": 2})
    await send(h, raw)
    [item] = await outbox(stores)
    assert item == {
        **envelope(item, "message", raw["event_id"]),
        "message": message_body(raw, msgtype="m.image", text="", media={
            "content_uri": "mxc://example.org/cAt_1", "name": "cat.png",
            "mimetype": "image/png", "size": 1234, "width": 3, "height": 2,
            "duration_ms": None,
        }),
    }
    assert await stores.matrix_messages.get(raw["event_id"]) == mapped(raw)


async def test_media_caption_rule(stores: Stores, dm: tuple[MatrixHandler, Recorder]) -> None:
    h, _ = dm
    captioned = media_message(body="look at **this**", filename="cat.png",
                              url="mxc://example.org/a", format=HTML,
                              formatted_body="look at <b>this</b>")
    same = media_message("m.file", body="report.pdf", filename="report.pdf",
                         url="mxc://example.org/b", format=HTML, formatted_body="<b>x</b>",
                         info={"mimetype": "application/pdf", "size": 10, "w": True})
    unnamed = media_message("m.video", body="clip.mp4", url="mxc://example.org/c",
                            info={"mimetype": "video/mp4", "duration": 4500, "size": "big"})
    await send(h, captioned, same, unnamed)
    first, second, third = [i["message"] for i in await outbox(stores)]
    assert (first["text"], first["html"], first["media"]["name"]) == (
        "look at **this**", "look at <b>this</b>", "cat.png")
    assert (first["media"]["mimetype"], first["media"]["size"]) == (None, None)
    assert (second["msgtype"], second["text"], second["html"]) == ("m.file", "", None)
    assert (second["media"]["name"], second["media"]["size"], second["media"]["width"]) == (
        "report.pdf", 10, None)
    # Without a filename the body is the file's name, not a caption.
    assert (third["msgtype"], third["text"], third["html"]) == ("m.video", "", None)
    assert third["media"] == {"content_uri": "mxc://example.org/c", "name": "clip.mp4",
                              "mimetype": "video/mp4", "size": None, "width": None,
                              "height": None, "duration_ms": 4500}


@pytest.mark.parametrize("content", [
    {"body": "secret.png", "file": {"url": "mxc://example.org/enc", "v": "v2",
                                    "key": {"k": "x"}, "iv": "y", "hashes": {}},
     "info": {"mimetype": "image/png", "size": 5}},
    {"body": "odd.png", "url": "https://example.org/odd.png"},
    {"body": "odd.png", "url": "mxc://example.org/with/slash"},
], ids=["encrypted file", "http url", "malformed mxc"])
async def test_media_without_a_usable_url_has_no_media_block(
    stores: Stores, dm: tuple[MatrixHandler, Recorder], content: dict[str, Any]
) -> None:
    h, _ = dm
    raw = media_message(**content)
    await send(h, raw)
    [item] = await outbox(stores)
    assert (item["message"]["msgtype"], item["message"]["media"]) == ("m.image", None)


# --- resends --------------------------------------------------------------------------------


async def test_a_resent_transaction_queues_nothing_twice(
    stores: Stores, dm: tuple[MatrixHandler, Recorder]
) -> None:
    h, rec = dm
    first = message()
    events = [
        first,
        reply(GHOST_EVENT, "answer"),
        reaction(GHOST_EVENT),
        edit(first["event_id"], "better"),
        redaction(GHOST_EVENT),
        media_message(body="a.png", url="mxc://example.org/a"),
    ]
    await h.handle_transaction("txn-1", events)
    queued = await outbox(stores)
    assert [i["type"] for i in queued] == ["message", "message", "reaction", "edit",
                                           "redaction", "message"]
    rows = await stores.db.fetchval("SELECT COUNT(*) FROM matrix_message")
    assert rows == 5
    await h.handle_transaction("txn-1", events)
    await h.handle_transaction("txn-2", list(reversed(events)))
    assert await outbox(stores) == queued
    assert await stores.db.fetchval("SELECT COUNT(*) FROM matrix_message") == rows
    assert rec.queued == [{"sms"}]
