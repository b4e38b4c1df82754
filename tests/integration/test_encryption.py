"""Encrypted DMs as users see them: the human's encrypting client (matrix-nio with its e2e
extra) on one side, the platform's pull feed on the other, each ghost with a device of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import olm
import pytest
from mautrix.errors import MatrixRequestError
from nio import AsyncClient, AsyncClientConfig, LoginResponse, RoomSendResponse, UploadResponse
from nio.crypto.attachments import decrypt_attachment, encrypt_attachment

from dmbridge import late_keys
from dmbridge.bridge import Bridge
from dmbridge.encryption import UNDECRYPTABLE_NOTICE, device_id_for
from dmbridge.startup import StartupError
from tests.integration.conftest import (
    DOMAIN,
    PASSWORD,
    BridgeFactory,
    Homeserver,
    Platform,
    wait_for,
)
from tests.integration.test_media import png
from tests.support.feed import Feed
from tests.support.matrix import Human
from tests.support.process import BridgeProcess
from tests.support.settings import CHAT_TOKEN, PICKLE_KEY, make_settings

NET = "chat"
ENCRYPTION = {"type": "m.room.encryption", "state_key": "",
              "content": {"algorithm": "m.megolm.v1.aes-sha2"}}


class EncryptingHuman(Human):
    """A Matrix user whose client encrypts, as Element X does: keys uploaded, devices queried
    before each send, messages decrypted as they are read."""

    async def sync_keys(self) -> None:
        """One sync (to-device keys come in), then the device keys it says are needed."""
        await self.client.sync(timeout=100)
        if self.client.should_upload_keys:
            await self.client.keys_upload()
        if self.client.should_query_keys:
            await self.client.keys_query()

    async def create_encrypted_dm(self, invitee: str, rotate_after: int | None = None) -> str:
        """An encrypted DM; ``rotate_after`` messages, senders change their room key."""
        encryption = {**ENCRYPTION, "content": {**ENCRYPTION["content"]}}
        if rotate_after is not None:
            encryption["content"]["rotation_period_msgs"] = rotate_after
        resp = await self.client.room_create(is_direct=True, invite=[invitee],
                                             initial_state=[encryption])
        room_id = getattr(resp, "room_id", None)
        assert isinstance(room_id, str), resp
        return room_id

    async def say_encrypted(self, room_id: str, text: str) -> str:
        await self.sync_keys()
        resp = await self.client.room_send(room_id, "m.room.message",
                                           {"msgtype": "m.text", "body": text},
                                           ignore_unverified_devices=True)
        assert isinstance(resp, RoomSendResponse), resp
        return str(resp.event_id)

    async def encrypted_type(self, room_id: str, event_id: str) -> str:
        """The type of the event as the homeserver holds it (nio would decrypt it)."""
        path = (f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}"
                f"/event/{quote(event_id, safe='')}")
        headers = {"Authorization": f"Bearer {self.client.access_token}"}
        resp = await self.client.send("GET", path, headers=headers)
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["type"])

    async def devices_of(self, user_id: str) -> dict[str, Any]:
        """The devices the homeserver lists for ``user_id`` (asked directly, not cached)."""
        headers = {"Authorization": f"Bearer {self.client.access_token}"}
        resp = await self.client.send("POST", "/_matrix/client/v3/keys/query",
                                      json.dumps({"device_keys": {user_id: []}}), headers)
        devices: dict[str, Any] = (await resp.json())["device_keys"].get(user_id, {})
        return devices

    async def decrypted_media(self, file: dict[str, Any]) -> bytes:
        """An encrypted attachment fetched from the homeserver and decrypted, as a client
        shows it."""
        server, media_id = file["url"].removeprefix("mxc://").split("/")
        headers = {"Authorization": f"Bearer {self.client.access_token}"}
        resp = await self.client.send(
            "GET", f"/_matrix/client/v1/media/download/{server}/{media_id}", headers=headers)
        assert resp.status == 200, await resp.text()
        return bytes(decrypt_attachment(await resp.read(), file["key"]["k"],
                                        file["hashes"]["sha256"], file["iv"]))

    async def read(self, room_id: str, count: int, timeout: float = 30.0
                   ) -> list[dict[str, Any]]:
        """The room's messages from others, decrypted, once there are ``count`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            await self.sync_keys()
            found = [m for m in await self.messages(room_id) if m["sender"] != self.user_id]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.user_id} read {found} in {room_id}; expected "
                                     f"{count} decrypted messages")
            await asyncio.sleep(0.2)


NewEncryptingHuman = Callable[..., Awaitable[EncryptingHuman]]


@pytest.fixture
async def encrypting_human(homeserver: Homeserver, tmp_path: Path
                           ) -> AsyncIterator[NewEncryptingHuman]:
    clients: list[AsyncClient] = []

    async def make(user_id: str | None = None) -> EncryptingHuman:
        """A new user, or another device (client) of ``user_id``."""
        if user_id is None:
            localpart = f"human-{uuid.uuid4().hex[:8]}"
            user_id = await asyncio.to_thread(homeserver.synapse.register_user, localpart,
                                              PASSWORD)
        store = tmp_path / f"nio-{uuid.uuid4().hex[:8]}"
        store.mkdir()
        client = AsyncClient(homeserver.url, user_id, store_path=str(store),
                             config=AsyncClientConfig(encryption_enabled=True,
                                                      store_sync_tokens=True))
        resp = await client.login(PASSWORD)
        assert isinstance(resp, LoginResponse), resp
        clients.append(client)
        human = EncryptingHuman(client)
        await human.sync_keys()
        return human

    yield make
    for client in clients:
        await client.close()


def _contact() -> str:
    return f"c{uuid.uuid4().hex[:12]}"


async def _send(platform: Platform, human: Human, contact: str, **body: Any) -> dict[str, Any]:
    status, answer = await platform.send(NET, CHAT_TOKEN, uuid.uuid4().hex, sender=contact,
                                         recipient=human.user_id, **body)
    assert status == 200, answer
    return dict(answer)


async def _dm_from_matrix(bridge: Bridge, human: EncryptingHuman, feed: Feed,
                          rotate_after: int | None = None) -> tuple[str, str]:
    """The human starts an encrypted DM with a never-seen ghost; (room, ghost) once joined."""
    contact = _contact()
    ghost_id = bridge.settings.networks.get(NET).ghost_user_id(contact)
    room_id = await human.create_encrypted_dm(ghost_id, rotate_after)
    await human.wait_membership(room_id, ghost_id, "join")
    await feed.expect("dm.started", room_id=room_id)
    return room_id, contact


async def test_encrypted_dm_started_from_matrix_works_both_ways(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
) -> None:
    bridge = await start_bridge(**{"dm.encryption": "allow"})
    feed = Feed(platform)
    human = await encrypting_human()
    # The room key changes every second message: the third of the platform's is under a new one.
    room_id, contact = await _dm_from_matrix(bridge, human, feed, rotate_after=2)

    event_id = await human.say_encrypted(room_id, "is this private?")
    assert await human.encrypted_type(room_id, event_id) == "m.room.encrypted"
    message = await feed.expect("message", room_id=room_id, text="is this private?")
    assert message["message"]["event_id"] == event_id

    sent = await _send(platform, human, contact, text="yes, encrypted")
    assert sent["room_id"] == room_id
    assert await human.encrypted_type(room_id, sent["event_id"]) == "m.room.encrypted"
    await _send(platform, human, contact, markdown="**bold** and _italic_")
    image = png(3, 2)
    async with platform.session.post(
        f"{platform.base}/networks/{NET}/media", data=image, params={"filename": "red.png"},
        headers={"Authorization": f"Bearer {CHAT_TOKEN}", "Content-Type": "image/png"},
    ) as resp:
        uploaded = await resp.json()
    await _send(platform, human, contact, media=uploaded["content_uri"], text="a red square")
    read = await human.read(room_id, 3)
    assert [m["content"]["body"] for m in read] == ["yes, encrypted", "**bold** and _italic_",
                                                    "a red square"]
    picture = read[2]["content"]
    assert picture["msgtype"] == "m.image" and "url" not in picture
    assert await human.decrypted_media(picture["file"]) == image
    html = read[1]["content"]["formatted_body"]
    assert html == "<p><strong>bold</strong> and <em>italic</em></p>"
    members = await human.client.joined_members(room_id)
    assert sorted(m.user_id for m in members.members) == sorted(  # type: ignore[union-attr]
        [human.user_id, bridge.settings.networks.get(NET).ghost_user_id(contact)])
    # The ghost's Olm account is stored under the config's dm.pickle_key, nothing else.
    ghost_id = bridge.settings.networks.get(NET).ghost_user_id(contact)
    pickle = await bridge.db.fetchval("SELECT account FROM crypto_account WHERE account_id=$1",
                                      ghost_id)
    pickle = pickle.encode() if isinstance(pickle, str) else bytes(pickle)
    assert olm.Account.from_pickle(pickle, PICKLE_KEY).identity_keys
    with pytest.raises(olm.OlmAccountError):
        olm.Account.from_pickle(pickle, "dmbridge.ghost-devices")


async def test_with_encryption_off_the_user_is_told_and_the_platform_gets_an_event(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
) -> None:
    bridge = await start_bridge()
    feed = Feed(platform)
    human = await encrypting_human()
    room_id, _ = await _dm_from_matrix(bridge, human, feed)

    event_id = await human.say_encrypted(room_id, "can you read this?")
    event = await feed.expect("message.undecryptable", room_id=room_id)
    assert event["message.undecryptable"]["event_id"] == event_id
    assert event["message.undecryptable"]["reason"] == "encryption_off"
    notice = (await human.read(room_id, 1))[0]
    assert notice["content"]["msgtype"] == "m.notice"
    assert notice["content"]["body"] == UNDECRYPTABLE_NOTICE
    assert notice["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == event_id
    assert "message" not in [e["type"] for e in feed.seen]


async def test_rooms_the_bridge_creates_are_encrypted_with_encryption_default(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
) -> None:
    bridge = await start_bridge(**{"dm.encryption": "default"})
    feed = Feed(platform)
    human, contact = await encrypting_human(), _contact()
    first = await _send(platform, human, contact, text="hello from the platform")
    room_id = first["room_id"]
    await human.wait_invite(room_id)
    await human.join(room_id)
    assert await human.encrypted_type(room_id, first["event_id"]) == "m.room.encrypted"
    assert [m["content"]["body"] for m in await human.read(room_id, 1)] == [
        "hello from the platform"]

    await human.say_encrypted(room_id, "hello from Matrix")
    await feed.expect("message", room_id=room_id, text="hello from Matrix")
    await _send(platform, human, contact, text="and back")
    assert [m["content"]["body"] for m in await human.read(room_id, 2)][-1] == "and back"
    members = await human.client.joined_members(room_id)
    ghost_id = bridge.settings.networks.get(NET).ghost_user_id(contact)
    assert sorted(m.user_id for m in members.members) == sorted(  # type: ignore[union-attr]
        [human.user_id, ghost_id])


async def test_the_users_new_device_reads_the_ghosts_later_messages(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
) -> None:
    bridge = await start_bridge(**{"dm.encryption": "allow"})
    feed = Feed(platform)
    human = await encrypting_human()
    room_id, contact = await _dm_from_matrix(bridge, human, feed)
    await human.say_encrypted(room_id, "first")
    await feed.expect("message", room_id=room_id, text="first")
    await _send(platform, human, contact, text="before the new device")
    await human.read(room_id, 1)

    second = await encrypting_human(human.user_id)
    ghost_id = bridge.settings.networks.get(NET).ghost_user_id(contact)
    machine = await bridge.encryption.machine(ghost_id)
    assert machine is not None

    async def knows_second() -> bool:  # the homeserver told the bridge of the device (MSC3202)
        devices = await machine.crypto_store.get_devices(human.client.user_id)
        return devices is not None and second.client.device_id in devices
    await wait_for(knows_second, what="the bridge to learn of the user's second device")

    await _send(platform, human, contact, text="after the new device")
    # Only what was sent after it appeared: the earlier key was never shared with it.
    read = await second.read(room_id, 1)
    assert [m["content"]["body"] for m in read] == ["after the new device"]
    assert [m["content"]["body"] for m in await human.read(room_id, 2)][-1] == (
        "after the new device")
    # And what the new device writes reaches the platform.
    await second.say_encrypted(room_id, "from my other device")
    await feed.expect("message", room_id=room_id, text="from my other device")


async def test_encrypted_dm_survives_a_restart_and_a_sigkill(
    homeserver: Homeserver, db_url: str, tmp_path: Path,
    encrypting_human: NewEncryptingHuman,
) -> None:
    settings = make_settings(tmp_path, homeserver_url=homeserver.url, domain=DOMAIN,
                             port=homeserver.bridge_port, db_url=db_url,
                             **{"logging.level": "INFO", "dm.encryption": "allow"})
    human, contact = await encrypting_human(), _contact()
    ghost_id = settings.networks.get(NET).ghost_user_id(contact)
    process = BridgeProcess(tmp_path / "config.yaml", tmp_path / "bridge.log")
    async with process, aiohttp.ClientSession() as session:
        platform = Platform(session, homeserver.bridge_port)
        feed = Feed(platform)
        process.start()
        await process.wait_ready(homeserver.bridge_port)
        room_id = await human.create_encrypted_dm(ghost_id)
        await human.wait_membership(room_id, ghost_id, "join")
        await feed.expect("dm.started", room_id=room_id)

        async def exchange(n: int) -> None:
            await human.say_encrypted(room_id, f"question {n}")
            await feed.expect("message", room_id=room_id, text=f"question {n}")
            await _send(platform, human, contact, text=f"answer {n}")
            read = await human.read(room_id, n)
            assert [m["content"]["body"] for m in read] == [
                f"answer {i}" for i in range(1, n + 1)], process.log_tail()

        await exchange(1)
        assert await process.kill() == -9
        process.start()
        await process.wait_ready(homeserver.bridge_port)
        await exchange(2)
        assert await process.terminate() == 0
        process.start()
        await process.wait_ready(homeserver.bridge_port)
        await exchange(3)
        await feed.pull(wait=1)
        assert sorted(feed.texts()) == ["question 1", "question 2", "question 3"]
        # One room key from the ghost for all three answers: restarts shared no new one.
        assert human.client.olm is not None
        own = human.client.olm.account.identity_keys["curve25519"]
        keys = [s.id for s in human.client.olm.inbound_group_store
                if s.room_id == room_id and s.sender_key != own]
        assert len(keys) == 1, keys
        assert "message.undecryptable" not in [e["type"] for e in feed.seen]
        # One device made once and kept: the ghost's device list is the same after restarts.
        devices = await human.devices_of(ghost_id)
        assert list(devices) == [device_id_for(ghost_id)], devices


async def test_encrypted_replies_edits_reactions_and_deletions_reach_the_platform(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
) -> None:
    bridge = await start_bridge(**{"dm.encryption": "allow"})
    feed = Feed(platform)
    human = await encrypting_human()
    room_id, contact = await _dm_from_matrix(bridge, human, feed)
    sent = await _send(platform, human, contact, text="pick a time")
    await human.read(room_id, 1)

    async def send(event_type: str, content: dict[str, Any]) -> str:
        await human.sync_keys()
        if event_type == "m.reaction":  # nio leaves reactions unencrypted; Element does not
            event_type, content = human.client.encrypt(room_id, event_type, content)
            path = (f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/send/{event_type}/"
                    f"{uuid.uuid4().hex}")
            headers = {"Authorization": f"Bearer {human.client.access_token}"}
            raw = await human.client.send("PUT", path, json.dumps(content), headers)
            event_id = str((await raw.json())["event_id"])
        else:
            resp = await human.client.room_send(room_id, event_type, content,
                                                ignore_unverified_devices=True)
            assert isinstance(resp, RoomSendResponse), resp
            event_id = str(resp.event_id)
        assert await human.encrypted_type(room_id, event_id) == "m.room.encrypted"
        return event_id

    reply_id = await send("m.room.message", {
        "msgtype": "m.text", "body": "noon",
        "m.relates_to": {"m.in_reply_to": {"event_id": sent["event_id"]}}})
    reply = await feed.expect("message", room_id=room_id, text="noon")
    assert reply["message"]["reply_to"]["event_id"] == sent["event_id"]
    await send("m.room.message", {
        "msgtype": "m.text", "body": "* one o'clock",
        "m.new_content": {"msgtype": "m.text", "body": "one o'clock"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": reply_id}})
    edit = await feed.expect("edit", room_id=room_id)
    assert edit["edit"]["text"] == "one o'clock"
    assert edit["edit"]["target"]["event_id"] == reply_id
    reaction_id = await send("m.reaction", {"m.relates_to": {
        "rel_type": "m.annotation", "event_id": sent["event_id"], "key": "👍"}})
    reaction = await feed.expect("reaction", room_id=room_id)
    assert reaction["reaction"]["key"] == "👍"
    assert reaction["reaction"]["target"]["event_id"] == sent["event_id"]
    await human.client.room_redact(room_id, reaction_id)
    redaction = await feed.expect("redaction", room_id=room_id)
    assert redaction["redaction"]["target"]["event_id"] == reaction_id


@pytest.mark.parametrize("fetch", ["works", "fails_once"])
async def test_the_users_encrypted_image_reaches_the_platform_decrypted(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
    monkeypatch: pytest.MonkeyPatch, fetch: str,
) -> None:
    bridge = await start_bridge(**{"dm.encryption": "allow"})
    feed = Feed(platform)
    human = await encrypting_human()
    room_id, contact = await _dm_from_matrix(bridge, human, feed)
    if fetch == "fails_once":  # the homeserver's media store answers 502 once: taken again
        machine = await bridge.encryption.machine(
            bridge.settings.networks.get(NET).ghost_user_id(contact))
        assert machine is not None
        download, failures = machine.client.download_media, [502]

        async def fails_once(*args: Any, **kwargs: Any) -> bytes:
            if failures:
                raise MatrixRequestError(failures.pop(), "bad gateway")  # type: ignore[arg-type]
            return await download(*args, **kwargs)

        monkeypatch.setattr(machine.client, "download_media", fails_once)
    image = png(4, 3)
    ciphertext, keys = encrypt_attachment(image)
    uploaded, _ = await human.client.upload(lambda *_: ciphertext,
                                            content_type="application/octet-stream",
                                            filesize=len(ciphertext))
    assert isinstance(uploaded, UploadResponse), uploaded
    await human.sync_keys()
    resp = await human.client.room_send(room_id, "m.room.message", {
        "msgtype": "m.image", "body": "me.png",
        "info": {"mimetype": "image/png", "size": len(image), "w": 4, "h": 3},
        "file": {"url": uploaded.content_uri, **keys}}, ignore_unverified_devices=True)
    assert isinstance(resp, RoomSendResponse), resp

    message = (await feed.expect("message", room_id=room_id))["message"]
    assert message["event_id"] == resp.event_id
    media = message["media"]
    assert (media["name"], media["mimetype"], media["width"]) == ("me.png", "image/png", 4)
    async with platform.session.get(media["url"], headers={
            "Authorization": f"Bearer {CHAT_TOKEN}"}) as got:
        assert got.status == 200
        assert await got.read() == image


async def test_with_encryption_required_an_unencrypted_dm_is_refused_and_an_encrypted_one_taken(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
) -> None:
    bridge = await start_bridge(**{"dm.encryption": "require"})
    feed = Feed(platform)
    human = await encrypting_human()
    ghost_id = bridge.settings.networks.get(NET).ghost_user_id(_contact())
    plain = await human.create_dm(ghost_id)
    await human.wait_membership(plain, ghost_id, "leave")
    assert await human.leave_reason(plain, ghost_id) == (
        "Chat contacts only take encrypted chats: start the DM with encryption on.")

    room_id = await human.create_encrypted_dm(ghost_id)
    await human.wait_membership(room_id, ghost_id, "join")
    await feed.expect("dm.started", room_id=room_id)
    await human.say_encrypted(room_id, "now encrypted")
    await feed.expect("message", room_id=room_id, text="now encrypted")


async def test_encryption_turned_on_in_a_plain_dm_gives_the_ghost_a_device_at_once(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
) -> None:
    bridge = await start_bridge(**{"dm.encryption": "allow"})
    feed = Feed(platform)
    human, contact = await encrypting_human(), _contact()
    first = await _send(platform, human, contact, text="a plain start")
    room_id = first["room_id"]
    await human.wait_invite(room_id)
    await human.join(room_id)
    assert await human.encrypted_type(room_id, first["event_id"]) == "m.room.message"
    await human.client.room_put_state(room_id, ENCRYPTION["type"], ENCRYPTION["content"])
    ghost_id = bridge.settings.networks.get(NET).ghost_user_id(contact)

    async def ghost_has_a_device() -> bool:
        return bool(await human.devices_of(ghost_id))
    await wait_for(ghost_has_a_device, what="the ghost's device")

    await human.say_encrypted(room_id, "now it is private")
    await feed.expect("message", room_id=room_id, text="now it is private")
    answer = await _send(platform, human, contact, text="private answer")
    assert await human.encrypted_type(room_id, answer["event_id"]) == "m.room.encrypted"
    assert [m["content"]["body"] for m in await human.read(room_id, 2)] == [
        "a plain start", "private answer"]


async def test_decrypted_text_the_databases_cannot_hold_does_not_stop_the_transactions(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bridge = await start_bridge(**{"dm.encryption": "allow"})
    feed = Feed(platform)
    human = await encrypting_human()
    room_id, _ = await _dm_from_matrix(bridge, human, feed)
    decrypt = bridge.encryption.decrypt

    async def plaintext_as_a_client_could_write_it(raw: dict[str, Any]) -> dict[str, Any]:
        plain = await decrypt(raw)
        content = dict(plain.get("content") or {})
        if content.get("body") == "LONE":  # JSON text may escape a lone surrogate or a NUL
            content["body"] = "a\ud800b\x00c"
        elif content.get("body") == "DEEP":
            nested: dict[str, Any] = {}
            for _ in range(200):
                nested = {"x": nested}
            content["x"] = nested
        return {**plain, "content": content}

    monkeypatch.setattr(bridge.encryption, "decrypt", plaintext_as_a_client_could_write_it)
    await human.say_encrypted(room_id, "LONE")
    await feed.expect("message", room_id=room_id, text="a\ufffdb\ufffdc")
    await human.say_encrypted(room_id, "DEEP")
    await human.say_encrypted(room_id, "after the deep one")
    await feed.expect("message", room_id=room_id, text="after the deep one")
    assert "DEEP" not in [e.get("message", {}).get("text") for e in feed.seen]


def _hold_room_keys(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """To-device events (room keys) kept from the ghosts' devices, as if still on their way."""
    held: list[dict[str, Any]] = []

    async def hold(raw: dict[str, Any]) -> None:
        held.append(raw)

    monkeypatch.setattr(bridge.encryption, "_to_device", hold)
    return held


async def _waits_for_its_key(bridge: Bridge, event_id: str) -> None:
    async def waiting() -> bool:
        return event_id in [w.event["event_id"] for w in await bridge.stores.undecrypted.oldest(10)]
    await wait_for(waiting, what=f"{event_id} to wait for its room key")


async def test_a_message_whose_room_key_comes_later_reaches_the_platform(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bridge = await start_bridge(**{"dm.encryption": "allow"})
    feed = Feed(platform)
    human = await encrypting_human()
    room_id, _ = await _dm_from_matrix(bridge, human, feed)
    held = _hold_room_keys(bridge, monkeypatch)

    event_id = await human.say_encrypted(room_id, "my key comes later")
    await _waits_for_its_key(bridge, event_id)
    assert held
    # The key's transaction comes after the message's was answered.
    monkeypatch.undo()
    await bridge.appservice.encryption.intake(  # type: ignore[union-attr]
        {"de.sorunome.msc2409.to_device": held}, [])
    message = await feed.expect("message", room_id=room_id, text="my key comes later")
    assert message["message"]["event_id"] == event_id
    assert await bridge.stores.undecrypted.oldest(10) == []
    await human.say_encrypted(room_id, "and the next one")
    await feed.expect("message", room_id=room_id, text="and the next one")
    assert "message.undecryptable" not in [e["type"] for e in feed.seen]


async def test_a_message_whose_room_key_never_comes_is_told_after_the_wait_across_a_restart(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(late_keys, "KEY_WAIT_S", 2.0)
    bridge = await start_bridge(**{"dm.encryption": "allow"})
    feed = Feed(platform)
    human = await encrypting_human()
    room_id, _ = await _dm_from_matrix(bridge, human, feed)
    _hold_room_keys(bridge, monkeypatch)
    event_id = await human.say_encrypted(room_id, "my key is lost")
    await _waits_for_its_key(bridge, event_id)
    await bridge.stop()

    await start_bridge(**{"dm.encryption": "allow"})  # the wait is over meanwhile
    event = await feed.expect("message.undecryptable", room_id=room_id)
    assert event["message.undecryptable"]["event_id"] == event_id
    assert event["message.undecryptable"]["reason"] == "keys_missing"
    notice = (await human.read(room_id, 1))[0]
    assert notice["content"]["body"] == UNDECRYPTABLE_NOTICE
    assert notice["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == event_id
    assert "message" not in [e["type"] for e in feed.seen]


async def test_the_users_new_device_reads_the_later_messages_of_every_ghost(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
) -> None:
    bridge = await start_bridge(**{"dm.encryption": "allow"})
    feed = Feed(platform)
    human = await encrypting_human()
    dms = [await _dm_from_matrix(bridge, human, feed) for _ in range(2)]
    for room_id, contact in dms:  # each ghost has a room key shared with the first device
        await _send(platform, human, contact, text=f"before, from {contact}")
        await human.read(room_id, 1)

    second = await encrypting_human(human.user_id)
    machines = [await bridge.encryption.machine(
        bridge.settings.networks.get(NET).ghost_user_id(contact)) for _, contact in dms]

    async def both_know_second() -> bool:  # the homeserver told the bridge of the device
        for machine in machines:
            assert machine is not None
            devices = await machine.crypto_store.get_devices(human.client.user_id)
            if devices is None or second.client.device_id not in devices:
                return False
        return True
    await wait_for(both_know_second, what="the bridge to learn of the user's second device")

    for _, contact in dms:
        await _send(platform, human, contact, text=f"after, from {contact}")
    for room_id, contact in dms:
        read = await second.read(room_id, 1)
        assert [m["content"]["body"] for m in read] == [f"after, from {contact}"]


async def test_a_room_key_the_database_failed_to_take_is_stored_again_and_replays_do_nothing(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman, platform: Platform,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    bridge = await start_bridge(**{"dm.encryption": "allow"})
    feed = Feed(platform)
    human = await encrypting_human()
    room_id, contact = await _dm_from_matrix(bridge, human, feed)
    machine = await bridge.encryption.machine(
        bridge.settings.networks.get(NET).ghost_user_id(contact))
    assert machine is not None
    store, failures = machine.crypto_store, [OSError("the database connection was reset")]
    put_group_session = store.put_group_session

    async def fails_once(*args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        await put_group_session(*args, **kwargs)

    monkeypatch.setattr(store, "put_group_session", fails_once)
    handled: list[dict[str, Any]] = []
    to_device = bridge.encryption._to_device

    async def recorded(raw: dict[str, Any]) -> None:
        handled.append(raw)
        await to_device(raw)

    monkeypatch.setattr(bridge.encryption, "_to_device", recorded)
    # The room key the database could not take is kept and stored again.
    await human.say_encrypted(room_id, "my key was nearly lost")
    await feed.expect("message", room_id=room_id, text="my key was nearly lost")
    assert not failures

    # The same to-device events again (a transaction resent after a crash): nothing happens.
    monkeypatch.setattr(bridge.encryption, "_to_device", to_device)
    caplog.clear()
    await bridge.encryption.intake({"de.sorunome.msc2409.to_device": list(handled)}, [])
    problems = [r.getMessage() for r in caplog.records
                if r.name.startswith("dmbridge.encryption") and r.levelname != "DEBUG"]
    assert problems == []
    await human.say_encrypted(room_id, "and after the replay")
    await feed.expect("message", room_id=room_id, text="and after the replay")
    assert "message.undecryptable" not in [e["type"] for e in feed.seen]


async def test_a_second_worker_with_encryption_on_is_refused_at_start(
    start_bridge: BridgeFactory, homeserver: Homeserver, db_url: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite takes one bridge process whatever the settings")
    await start_bridge(**{"dm.encryption": "allow"})
    assert "encryption is on: this must be the bridge's only worker" in caplog.text
    second = Bridge(homeserver.settings(db_url, tmp_path / "second", **{"dm.encryption": "allow"}))
    with pytest.raises(StartupError) as refused:
        await second.start()
    await second.stop()
    assert str(refused.value).startswith(
        "dm.encryption is on and another bridge worker on this database already runs with it")
    assert "dmbridge-encryption/" in str(refused.value)


async def test_an_invite_the_ghost_refuses_gives_it_no_device(
    start_bridge: BridgeFactory, encrypting_human: NewEncryptingHuman,
) -> None:
    bridge = await start_bridge(**{"dm.encryption": "allow"})
    human = await encrypting_human()
    ghost_id = bridge.settings.networks.get(NET).ghost_user_id(_contact())
    resp = await human.client.room_create(is_direct=False, invite=[ghost_id],
                                          initial_state=[ENCRYPTION])
    room_id = getattr(resp, "room_id", None)
    assert isinstance(room_id, str), resp
    await human.wait_membership(room_id, ghost_id, "leave")  # not a DM: refused
    assert await bridge.encryption.machine(ghost_id, create=False) is None
    assert await bridge.db.fetchval(
        "SELECT COUNT(*) FROM crypto_account WHERE account_id = $1", ghost_id) == 0
