"""The platform SDK (dmbridge_client) against a running bridge, as the human's client sees it."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from dmbridge_client import (
    Client,
    Declined,
    DirectMessage,
    Edit,
    InvalidParam,
    Notice,
    NotYourMessage,
    Reaction,
    ReadReceipt,
    Router,
    Sent,
    Target,
    Typing,
)
from nio import MessageDirection, RoomMessagesResponse, RoomSendResponse, UploadResponse

from dmbridge.api import PREFIX
from dmbridge.bridge import Bridge
from dmbridge.embedded import client_for
from dmbridge.opening import MOVED_REASON
from tests.integration.conftest import Homeserver, accept_dm, bridge_sees, wait_for
from tests.integration.test_media import png
from tests.support.matrix import Human
from tests.support.settings import CHAT_TOKEN, SMS_TOKEN


def _contact() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


def _client(homeserver: Homeserver, **options: Any) -> Client:
    return Client(f"http://127.0.0.1:{homeserver.bridge_port}", CHAT_TOKEN, "chat", **options)


async def _timeline(human: Human, room_id: str) -> list[dict[str, Any]]:
    resp = await human.client.room_messages(room_id, start=None,
                                            direction=MessageDirection.back, limit=300)
    assert isinstance(resp, RoomMessagesResponse), resp
    return [e.source for e in reversed(resp.chunk)]


async def _event(human: Human, room_id: str, event_id: str) -> dict[str, Any]:
    """The event as the human's client shows it, once it can."""
    found: dict[str, Any] = {}

    async def seen() -> bool:
        for event in await _timeline(human, room_id):
            if event["event_id"] == event_id:
                found.update(event)
                return True
        return False

    await wait_for(seen, what=f"{human.user_id} to see {event_id}")
    return found


async def _processed(bridge: Bridge, event_id: str) -> None:
    """Until the bridge has taken ``event_id`` from the homeserver's transactions."""
    async def taken() -> bool:
        return bool(await bridge.stores.db.fetchval(
            "SELECT COUNT(*) FROM processed_event WHERE event_id=$1", event_id))

    await wait_for(taken, what=f"the bridge to process {event_id}")


@pytest.fixture(params=["http", "in-process"])
async def client(request: pytest.FixtureRequest, homeserver: Homeserver, bridge: Bridge
                 ) -> AsyncIterator[Client]:
    """The chat network's client: over the listener, or calling the bridge in this process."""
    async with _client(homeserver) if request.param == "http" else client_for(bridge, "chat") \
            as c:
        yield c


async def test_every_call_of_the_client_reaches_the_human(
    bridge: Bridge, client: Client, new_human: Any, tmp_path: Path
) -> None:
    """open_dm, send (text, HTML, markdown, files from bytes, a path and a stream, a reply),
    edit, react, delete, typing, mark_read, send_message and list_dms, as the human sees them."""
    human: Human = await new_human()
    contact = _contact()
    ghost = bridge.settings.networks.get("chat").ghost_user_id(contact)

    dm = await client.open_dm(contact, human.user_id, name="Parcel Service")
    assert (dm.created, dm.is_dm, dm.ghost_id, dm.user_id, dm.remote_id) == (
        True, True, ghost, human.user_id, contact)
    invite = await human.wait_invite(dm.room_id)
    assert invite.sender == ghost and invite.content.get("is_direct") is True
    await accept_dm(human, dm.room_id, bridge)
    again = await client.open_dm(contact, human.user_id)
    assert (again.room_id, again.created, again.user_membership) == (dm.room_id, False, "join")

    plain = await dm.send("Your parcel has arrived.")
    event = await _event(human, dm.room_id, plain.event_id)
    assert (event["sender"], event["content"]["body"]) == (ghost, "Your parcel has arrived.")
    html = await dm.send(html="It is <b>here</b>.")
    assert (await _event(human, dm.room_id, html.event_id))["content"]["formatted_body"] == \
        "It is <b>here</b>."
    marked = await dm.send(markdown="It is **here**.")
    assert (await _event(human, dm.room_id, marked.event_id))["content"]["formatted_body"] == \
        "<p>It is <strong>here</strong>.</p>"

    # The same message ID again posts nothing: a retry never shows twice.
    retried = await dm.send("Your parcel has arrived.", message_id=plain.message_id)
    assert (retried.duplicate, retried.event_id) == (True, plain.event_id)

    # Files from bytes, from a path and from a stream.
    image = await client.upload(png(3, 2), content_type="image/png", filename="red.png")
    path = tmp_path / "blue.png"
    path.write_bytes(png(5, 4, b"\x00\x00\xff"))
    from_path = await client.upload(path, content_type="image/png")
    from_stream = await client.upload(io.BytesIO(b"a,b\n1,2\n"), content_type="text/csv",
                                      filename="table.csv")
    assert (image.width, from_path.filename, from_path.width, from_stream.mimetype) == (
        3, "blue.png", 5, "text/csv")
    for upload, msgtype, caption in ((image, "m.image", "Left at the door."),
                                     (from_path, "m.image", None), (from_stream, "m.file", None)):
        sent = await dm.send(caption, media=upload)
        content = (await _event(human, dm.room_id, sent.event_id))["content"]
        assert (content["msgtype"], content["url"]) == (msgtype, upload.content_uri)

    # A reply to the human, an edit, a reaction, a deletion.
    question = await human.say(dm.room_id, "Where exactly?")
    await _processed(bridge, question)
    answer = await dm.send("Behind the plant pot.", reply_to=question)
    content = (await _event(human, dm.room_id, answer.event_id))["content"]
    assert content["m.relates_to"]["m.in_reply_to"]["event_id"] == question
    edit = await dm.edit(answer, "Behind the big plant pot.")
    content = (await _event(human, dm.room_id, edit.event_id))["content"]
    assert content["m.relates_to"] == {"rel_type": "m.replace", "event_id": answer.event_id}
    assert content["m.new_content"]["body"] == "Behind the big plant pot."
    thumbs = await dm.react(question, "👍")
    content = (await _event(human, dm.room_id, thumbs.event_id))["content"]
    assert content["m.relates_to"] == {"rel_type": "m.annotation", "event_id": question,
                                       "key": "👍"}
    deleted = await dm.delete(marked, reason="said twice")
    assert deleted.duplicate is False
    gone = await _event(human, dm.room_id, marked.event_id)
    assert gone["unsigned"]["redacted_because"]["event_id"] == deleted.event_id
    assert (await dm.delete(marked)).duplicate is True

    # Typing for as long as the block runs, then not.
    def typing_users() -> list[str]:
        room = human.client.rooms.get(dm.room_id)
        return list(room.typing_users) if room is not None else []

    async with dm.typing():
        await human.sync_until(lambda: ghost in typing_users())
    await human.sync_until(lambda: ghost not in typing_users())

    # Read: the contact has read the human's question.
    await dm.mark_read(question)
    await human.sync_until(lambda: _read_up_to(human, dm.room_id, ghost) == question)

    # The one-liner lands in the same DM; the lists find it by either side.
    one = await client.send_message(contact, human.user_id, "One more thing.")
    assert (one.room_id, one.room_created) == (dm.room_id, False)
    assert (await _event(human, dm.room_id, one.event_id))["content"]["body"] == "One more thing."
    by_user = await client.list_dms(user_id=human.user_id)
    by_sender = await client.list_dms(sender=contact)
    assert [(d.room_id, d.remote_id) for d in by_user] == [(dm.room_id, contact)]
    assert [(d.room_id, d.user_id) for d in by_sender] == [(dm.room_id, human.user_id)]


async def test_handlers_see_what_the_human_does_and_answer_in_the_dm(
    bridge: Bridge, client: Client, new_human: Any, tmp_path: Path
) -> None:
    """run(): the human's message, typing, read receipt, edit and reaction reach the
    handlers; message.reply lands as a reply in the same DM; the cursor file follows."""
    human: Human = await new_human()
    contact = _contact()
    sent = await client.send_message(contact, human.user_id, "Hello?")
    await accept_dm(human, sent.room_id, bridge)
    seen: list[Any] = []

    @client.on_direct_message
    async def answer(message: DirectMessage) -> None:
        seen.append(message)
        await message.reply(f"You said: {message.text}")
        await message.mark_read()

    @client.on_typing
    async def typing(event: Typing) -> None:
        seen.append(event)

    @client.on_read
    async def read(event: ReadReceipt) -> None:
        seen.append(event)

    @client.on_edit
    async def edited(event: Edit) -> None:
        seen.append(event)

    @client.on_reaction
    async def reacted(event: Reaction) -> None:
        seen.append(event)

    cursor = tmp_path / "cursor"
    running = asyncio.create_task(client.run(cursor_file=cursor, wait=1, handle_signals=False))
    await human.client.update_receipt_marker(sent.room_id, sent.event_id)
    said = await human.say(sent.room_id, "Hi there")
    replies = await human.wait_messages(sent.room_id, 3)
    echo = replies[-1]
    assert echo["content"]["body"].endswith("You said: Hi there")
    assert echo["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == said
    ghost = bridge.settings.networks.get("chat").ghost_user_id(contact)
    await human.sync_until(lambda: _read_up_to(human, sent.room_id, ghost) == said)
    await human.client.room_send(sent.room_id, "m.reaction", {"m.relates_to": {
        "rel_type": "m.annotation", "event_id": sent.event_id, "key": "🎉"}})
    await wait_for(lambda: _has(seen, Reaction), what="the reaction handler")
    await human.client.room_typing(sent.room_id, True, 20_000)
    await wait_for(lambda: _has(seen, Typing), what="the typing handler")
    await human.client.room_send(sent.room_id, "m.room.message", {
        "msgtype": "m.text", "body": "* Hi there, edited",
        "m.new_content": {"msgtype": "m.text", "body": "Hi there, edited"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": said}})
    await wait_for(lambda: _has(seen, Edit), what="the edit handler")
    client.stop()
    await asyncio.wait_for(running, 30)

    message = next(e for e in seen if isinstance(e, DirectMessage))
    assert (message.text, message.event_id, message.dm.room_id, message.dm.is_dm) == (
        "Hi there", said, sent.room_id, True)
    receipt = next(e for e in seen if isinstance(e, ReadReceipt))
    assert (receipt.message_id, receipt.event_id) == (sent.message_id, sent.event_id)
    reaction = next(e for e in seen if isinstance(e, Reaction))
    assert (reaction.key, reaction.target and reaction.target.message_id) == (
        "🎉", sent.message_id)
    typing_event = next(e for e in seen if isinstance(e, Typing))
    assert (typing_event.typing, typing_event.dm.room_id) == (True, sent.room_id)
    edit = next(e for e in seen if isinstance(e, Edit))
    assert (edit.text, edit.target and edit.target.event_id) == ("Hi there, edited", said)
    assert int(cursor.read_text()) >= edit.id


def _read_up_to(human: Human, room_id: str, user_id: str) -> str | None:
    """The event the human's client shows ``user_id`` has read up to in the room."""
    room = human.client.rooms.get(room_id)
    receipt = room.read_receipts.get(user_id) if room is not None else None
    return getattr(receipt, "event_id", None)


async def _has(seen: list[Any], kind: type) -> bool:
    return any(isinstance(e, kind) for e in seen)


async def test_a_declined_user_raises_declined_with_what_to_do(
    bridge: Bridge, client: Client, new_human: Any
) -> None:
    """The human rejects the ghost's invite: the dm.declined handler hears it, and the next
    send raises Declined, saying to stop."""
    human: Human = await new_human()
    contact = _contact()
    dm = await client.open_dm(contact, human.user_id)
    notices: list[Notice] = []

    @client.on_dm_declined
    async def declined(notice: Notice) -> None:
        notices.append(notice)
        client.stop()

    running = asyncio.create_task(client.run(wait=1, handle_signals=False))
    await human.wait_invite(dm.room_id)
    await human.reject(dm.room_id)
    await asyncio.wait_for(running, 60)
    assert [(n.type, n.state, n.reason, n.remote_id, n.dm.room_id) for n in notices] == [
        ("dm.declined", "declined", "invite_rejected", contact, dm.room_id)]
    await bridge_sees(bridge, dm.room_id, human.user_id, "leave")
    with pytest.raises(Declined) as refused:
        await client.send_message(contact, human.user_id, "Still there?")
    assert refused.value.status == 403 and refused.value.code == "DMBRIDGE_DECLINED"
    assert "stop writing to them and fall back to another channel" in str(refused.value)
    assert refused.value.request_id


async def test_create_dm_opens_a_new_room_and_the_old_one_is_no_longer_used(
    bridge: Bridge, client: Client, new_human: Any
) -> None:
    """The contact leaves the old room saying why and invites the human to a new one, where
    the next message lands; asked again for the same replacement, the bridge makes no third
    room; what the human writes in the old room no longer reaches the handlers."""
    human: Human = await new_human()
    contact = _contact()
    ghost = bridge.settings.networks.get("chat").ghost_user_id(contact)
    first = await client.send_message(contact, human.user_id, "In the old room")
    old = first.room_id
    await accept_dm(human, old, bridge)

    fresh = await client.create_dm(contact, human.user_id)
    assert (fresh.created, fresh.replaced_room_id, fresh.is_dm) == (True, old, True)
    assert fresh.room_id != old
    await human.wait_membership(old, ghost, "leave")
    assert await human.leave_reason(old, ghost) == MOVED_REASON
    invite = await human.wait_invite(fresh.room_id)
    assert invite.sender == ghost and invite.content.get("is_direct") is True
    # The same replacement again (a retry after a lost answer): the room already made.
    again = await client.create_dm(contact, human.user_id, replaces=old)
    assert (again.room_id, again.created, again.replaced_room_id) == (fresh.room_id, False,
                                                                       None)
    await human.client.sync(timeout=500)
    assert set(human.client.invited_rooms) == {fresh.room_id}

    await accept_dm(human, fresh.room_id, bridge)
    sent = await client.send_message(contact, human.user_id, "In the new room")
    assert (sent.room_id, sent.room_created) == (fresh.room_id, False)
    assert [m["content"]["body"] for m in await human.wait_messages(fresh.room_id, 1)] == [
        "In the new room"]
    assert [m["content"]["body"] for m in await human.messages(old)] == ["In the old room"]
    assert [dm.room_id for dm in await client.list_dms(sender=contact)] == [fresh.room_id]

    heard: list[str] = []

    @client.on_direct_message
    async def hear(message: DirectMessage) -> None:
        if message.user_id != human.user_id:
            return
        heard.append(message.text)
        if message.room_id == fresh.room_id:
            client.stop()

    running = asyncio.create_task(client.run(wait=1, handle_signals=False))
    await human.say(old, "written in the old room")
    await human.say(fresh.room_id, "written in the new room")
    await asyncio.wait_for(running, 60)
    # One lane per DM: the old room's message, had it been delivered, would have come first.
    assert heard == ["written in the new room"]


async def test_a_late_message_keeps_its_original_time(
    bridge: Bridge, client: Client, new_human: Any
) -> None:
    """ts as a datetime (in any zone) or as milliseconds: the human's client shows the
    message at that time; without it, at the homeserver's."""
    human: Human = await new_human()
    contact = _contact()
    written = datetime.now(timezone(timedelta(hours=-5))) - timedelta(hours=3)
    sent = await client.send_message(contact, human.user_id, "Queued for three hours",
                                     ts=written)
    await accept_dm(human, sent.room_id, bridge)
    dm = await client.open_dm(contact, human.user_id)
    older = int(time.time() * 1000) - 86_400_000
    earlier = await dm.send("Queued for a day", ts=older)
    now = await dm.send("Sent now")
    shown = {e["event_id"]: e["origin_server_ts"] for e in await _timeline(human, dm.room_id)}
    assert shown[sent.event_id] == (written - datetime(1970, 1, 1, tzinfo=UTC)
                                    ) // timedelta(milliseconds=1)
    assert shown[earlier.event_id] == older
    assert shown[now.event_id] > shown[sent.event_id]
    with pytest.raises(InvalidParam, match="seconds given for milliseconds"):
        await dm.send("In seconds", ts=older // 1000)


async def test_a_thread_both_ways(bridge: Bridge, client: Client, new_human: Any) -> None:
    """The platform writes in the thread of its message; the human answers in the thread as
    Element does; the handler sees the thread's root as the platform's message, and its
    message.reply lands in the thread as a real reply to the human. Editing the human's
    message is refused with NotYourMessage."""
    human: Human = await new_human()
    contact = _contact()
    dm = await client.open_dm(contact, human.user_id)
    await accept_dm(human, dm.room_id, bridge)
    root = await dm.send("Your order has shipped.")
    in_thread = await dm.send("It left the depot.", thread_root=root)
    content = (await _event(human, dm.room_id, in_thread.event_id))["content"]
    assert content["m.relates_to"] == {
        "rel_type": "m.thread", "event_id": root.event_id, "is_falling_back": True,
        "m.in_reply_to": {"event_id": root.event_id}}

    seen: list[DirectMessage] = []
    replies: list[Sent] = []

    @client.on_direct_message
    async def answer(message: DirectMessage) -> None:
        if message.user_id != human.user_id:
            return
        seen.append(message)
        replies.append(await message.reply("Tomorrow."))
        client.stop()

    running = asyncio.create_task(client.run(wait=1, handle_signals=False))
    asked = await human.client.room_send(dm.room_id, "m.room.message", {
        "msgtype": "m.text", "body": "When will it arrive?",
        "m.relates_to": {"rel_type": "m.thread", "event_id": root.event_id,
                         "is_falling_back": True,
                         "m.in_reply_to": {"event_id": in_thread.event_id}}})
    assert isinstance(asked, RoomSendResponse), asked
    await asyncio.wait_for(running, 60)
    [message] = seen
    assert (message.text, message.event_id, message.reply_to) == (
        "When will it arrive?", asked.event_id, None)
    assert message.thread_root == Target(root.event_id, root.message_id, "message")
    reply = await _event(human, dm.room_id, replies[0].event_id)
    assert reply["sender"] == dm.ghost_id
    assert reply["content"]["m.relates_to"] == {
        "rel_type": "m.thread", "event_id": root.event_id, "is_falling_back": False,
        "m.in_reply_to": {"event_id": asked.event_id}}

    with pytest.raises(NotYourMessage) as refused:
        await dm.edit(asked.event_id, "Changed your words")
    assert refused.value.status == 403 and "only the sender" in str(refused.value)


async def test_the_network_described_by_the_bridge_routes_and_names_ghosts(
    bridge: Bridge, homeserver: Homeserver, new_human: Any
) -> None:
    """Clients given no pattern: the router asks the bridge, sends a phone number through the
    SMS network and a handle through the chat network, and the ghost IDs the description
    gives are the ones that invite the human."""
    human: Human = await new_human()
    base = f"http://127.0.0.1:{homeserver.bridge_port}"
    sms, chat = Client(base, SMS_TOKEN, "sms"), Client(base, CHAT_TOKEN, "chat")
    router = Router([sms, chat])
    phone, handle = "+1555" + str(uuid.uuid4().int)[:7], _contact()
    try:
        by_sms = await router.send_message(phone, human.user_id, "From a phone")
        by_chat = await router.send_message(handle, human.user_id, "From a chat")
    finally:
        await router.close()
    assert sms.info is not None and chat.info is not None
    assert (sms.info.network, chat.info.network, chat.info.delivery_mode) == ("sms", "chat",
                                                                             "pull")
    assert chat.info.limits.max_body_bytes == bridge.settings.max_body_bytes
    for sent, info, remote_id in ((by_sms, sms.info, phone), (by_chat, chat.info, handle)):
        invite = await human.wait_invite(sent.room_id)
        assert invite.sender == info.ghost_user_id(remote_id)


async def test_router_sends_each_remote_user_through_its_own_network(
    bridge: Bridge, new_human: Any
) -> None:
    """A phone number goes out through the SMS network, a chat handle through the chat
    network (clients of the embedded bridge, patterns from its config): the human gets two
    DMs, from the two networks' ghosts."""
    human: Human = await new_human()
    networks = bridge.settings.networks
    router = Router([client_for(bridge, "sms"), client_for(bridge, "chat")])
    phone, handle = "+1555" + str(uuid.uuid4().int)[:7], _contact()
    try:
        by_sms = await router.send_message(phone, human.user_id, "From a phone")
        by_chat = await router.send_message(handle, human.user_id, "From a chat")
    finally:
        await router.close()
    for sent, network, remote_id in ((by_sms, "sms", phone), (by_chat, "chat", handle)):
        invite = await human.wait_invite(sent.room_id)
        assert invite.sender == networks.get(network).ghost_user_id(remote_id)
    assert by_sms.room_id != by_chat.room_id


def _api_requests(bridge: Bridge) -> int:
    """Requests the bridge's listener answered on the platform API's network routes."""
    return int(sum(
        sample.value for metric in bridge.metrics.http_requests.collect()
        for sample in metric.samples if sample.name.endswith("_total")
        and sample.labels["route"].startswith(PREFIX + "/networks/")))


async def test_the_in_process_client_never_calls_the_listener(
    bridge: Bridge, new_human: Any
) -> None:
    """In-process: the network's description, a DM, an upload and a message with it, the
    human's file received by a handler and downloaded, a reply: the human sees the picture and
    the reply, the handler has the file's bytes, and the listener answered no API request (one
    call over HTTP afterwards is counted)."""
    human: Human = await new_human()
    contact = _contact()
    note = b"the delivery note\n"
    received: list[bytes] = []
    before = _api_requests(bridge)
    async with client_for(bridge, "chat") as client:
        info = await client.network_info()
        dm = await client.open_dm(contact, human.user_id, name="Parcel Service")
        await accept_dm(human, dm.room_id, bridge)
        picture = await client.upload(png(2, 2), content_type="image/png", filename="dot.png")
        shown = await dm.send("The parcel", media=picture)

        @client.on_direct_message
        async def got_file(message: DirectMessage) -> None:
            if message.media is not None:
                received.append(await client.download(message.media))
                await message.reply("Got your note")
                client.stop()

        running = asyncio.create_task(client.run(wait=1, handle_signals=False))
        uploaded, _ = await human.client.upload(lambda *_: io.BytesIO(note), "text/plain",
                                                "note.txt", filesize=len(note))
        assert isinstance(uploaded, UploadResponse), uploaded
        await human.client.room_send(dm.room_id, "m.room.message", {
            "msgtype": "m.file", "body": "note.txt", "url": uploaded.content_uri,
            "info": {"mimetype": "text/plain", "size": len(note)}})
        await asyncio.wait_for(running, 60)
    assert (info.network, dm.ghost_id) == ("chat", info.ghost_user_id(contact))
    assert received == [note]
    content = (await _event(human, dm.room_id, shown.event_id))["content"]
    assert (content["msgtype"], content["url"]) == ("m.image", picture.content_uri)
    bodies = [m["content"]["body"] for m in await human.messages(dm.room_id)
              if m["sender"] == dm.ghost_id]
    assert bodies[-1].endswith("Got your note")
    assert _api_requests(bridge) == before

    async with client_for(bridge, "chat", over_http=True) as over_http:
        await over_http.network_info()
    assert _api_requests(bridge) == before + 1
