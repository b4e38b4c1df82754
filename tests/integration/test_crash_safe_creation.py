"""DM creation through crashes and failures, against Synapse: one room, nothing lost or left.

The bridge talks to Synapse through a proxy (tests/support/holding_proxy.py) that can hold or
replace createRoom's answer after Synapse has made the room.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nio import SyncResponse

from tests.integration.conftest import (
    DOMAIN,
    BridgeFactory,
    Homeserver,
    NewHuman,
    Platform,
)
from tests.support.feed import Feed
from tests.support.holding_proxy import HoldingProxy
from tests.support.process import BridgeProcess
from tests.support.settings import AS_TOKEN, CHAT_TOKEN, make_settings

pytestmark = pytest.mark.integration

UNREACHABLE = "@someone:example.invalid"  # Synapse here federates with nobody


@pytest.fixture
async def proxy(homeserver: Homeserver) -> AsyncIterator[HoldingProxy]:
    async with HoldingProxy(homeserver.url) as running:
        yield running


def _contact() -> tuple[str, str]:
    """A chat user's remote ID and their ghost's user ID."""
    remote_id = f"c{uuid.uuid4().hex[:10]}"
    return remote_id, f"@dm_chat_{remote_id}:{DOMAIN}"


async def _ghost_rooms(homeserver: Homeserver, ghost_id: str) -> list[str]:
    """The rooms the ghost is joined to, as Synapse says (asked as the ghost)."""
    async with aiohttp.ClientSession() as session, session.get(
        f"{homeserver.url}/_matrix/client/v3/joined_rooms",
        params={"user_id": ghost_id}, headers={"Authorization": f"Bearer {AS_TOKEN}"},
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return list(body["joined_rooms"])


async def _register_ghost(platform: Platform, remote_id: str) -> None:
    status, body = await platform.call("PUT", f"/networks/chat/ghosts/{remote_id}/profile",
                                       CHAT_TOKEN, json={"name": "Carol"})
    assert status == 200, body


async def _send(platform: Platform, remote_id: str, recipient: str, message_id: str,
                text: str) -> tuple[int, Any]:
    return await platform.send("chat", CHAT_TOKEN, message_id, sender=remote_id,
                               recipient=recipient, text=text)


@pytest.mark.parametrize("held", ["answer", "request"])
async def test_a_room_made_as_the_bridge_was_killed_is_the_dm_after_restart(
    homeserver: Homeserver, proxy: HoldingProxy, db_url: str, tmp_path: Path,
    platform: Platform, new_human: NewHuman, held: str,
) -> None:
    """SIGKILL while createRoom's answer is held: Synapse made the room and invited the human.
    (Or while the request is held, and Synapse makes the room once the bridge is dead: then
    the bridge finds it from Synapse after the restart, not from its transaction.)

    After the restart that room is the DM: the platform's messages land in it, without waiting
    for creation_timeout (300 s here: a wait would time the test out), and everything the human
    writes there, before and after the restart, reaches the platform.
    """
    folder = tmp_path / "proc"
    make_settings(folder, homeserver_url=proxy.url, domain=DOMAIN, port=homeserver.bridge_port,
                  db_url=db_url, **{"dm.creation_timeout": 300})
    human = await new_human()
    remote_id, ghost_id = _contact()
    feed = Feed(platform)
    async with BridgeProcess(folder / "config.yaml", folder / "bridge.log") as proc:
        proc.start()
        await proc.wait_ready(homeserver.bridge_port)
        proxy.hold_create_room(request=held == "request")
        first = asyncio.create_task(_send(platform, remote_id, human.user_id, "m1", "first"))
        await proxy.wait_held()
        assert await proc.kill() == -9
        with pytest.raises(aiohttp.ClientError):
            await first  # the platform's request died with the bridge
        if held == "request":
            proxy.release()  # Synapse gets createRoom now, from a bridge that is gone
        room_id = await proxy.wait_created()

        await human.wait_invite(room_id)
        await human.join(room_id)
        before = await human.say(room_id, "written while the bridge was down")

        proxy.release()
        proc.start()
        await proc.wait_ready(homeserver.bridge_port)
        status, retried = await _send(platform, remote_id, human.user_id, "m1", "first")
        assert status == 200, retried
        assert retried["room_id"] == room_id
        status, second = await _send(platform, remote_id, human.user_id, "m2", "second")
        assert (status, second["room_id"], second["room_created"]) == (200, room_id, False)

        texts = [m["content"]["body"] for m in await human.wait_messages(room_id, 3)]
        assert texts == ["written while the bridge was down", "first", "second"]
        got_before = await feed.expect("message", room_id=room_id, timeout=120)
        assert (got_before["message"]["text"], got_before["message"]["event_id"]) == (
            "written while the bridge was down", before)
        after = await human.say(room_id, "written after the restart")
        got_after = await feed.expect("message", room_id=room_id, timeout=60)
        assert (got_after["message"]["text"], got_after["message"]["event_id"]) == (
            "written after the restart", after)

        assert await _ghost_rooms(homeserver, ghost_id) == [room_id]
        synced = await human.client.sync(timeout=500)
        assert isinstance(synced, SyncResponse), synced
        assert list(synced.rooms.invite) == []  # no second room's invite
        joined = await human.client.joined_rooms()
        assert list(joined.rooms) == [room_id]  # type: ignore[union-attr]
        assert proxy.created == [room_id]
        await proc.terminate()


async def test_a_recipient_on_a_server_not_federated_with_gets_a_precise_error_and_no_room(
    homeserver: Homeserver, proxy: HoldingProxy, start_bridge: BridgeFactory,
    platform: Platform,
) -> None:
    await start_bridge(**{"homeserver.address": proxy.url})
    remote_id, ghost_id = _contact()
    await _register_ghost(platform, remote_id)
    for attempt in ("1", "2"):
        status, body = await _send(platform, remote_id, UNREACHABLE, "m1", f"try {attempt}")
        assert (status, body["errcode"]) == (422, "DMBRIDGE_RECIPIENT_UNREACHABLE"), body
        assert UNREACHABLE in body["error"]
        assert await _ghost_rooms(homeserver, ghost_id) == []
    assert proxy.created == []  # refused before a room was made


async def test_a_room_made_before_the_invite_to_another_server_failed_is_removed(
    homeserver: Homeserver, proxy: HoldingProxy, start_bridge: BridgeFactory,
    platform: Platform,
) -> None:
    """Synapse makes the room, then fails createRoom ("Federation denied", a 403 here; a 502
    on other versions): nothing stays."""
    await start_bridge(**{"homeserver.address": proxy.url})
    remote_id, ghost_id = _contact()
    await _register_ghost(platform, remote_id)
    for attempt in ("1", "2"):
        # The recipient's profile seems fine, so the bridge goes on to createRoom.
        proxy.answer("GET", f"/profile/{UNREACHABLE}", 200, {})
        status, body = await _send(platform, remote_id, UNREACHABLE, "m1", f"try {attempt}")
        assert (status, body["errcode"]) == (422, "DMBRIDGE_RECIPIENT_UNREACHABLE"), body
        assert await _ghost_rooms(homeserver, ghost_id) == []
    # Synapse made a room each time (and then refused the invite): the bridge removed them.
    assert [("Federation denied" in body, status != 200) for status, body in proxy.create_answers
            ] == [(True, True)] * 2


async def test_a_lost_create_room_answer_leaves_no_room_and_the_next_try_makes_one(
    homeserver: Homeserver, proxy: HoldingProxy, start_bridge: BridgeFactory,
    platform: Platform, new_human: NewHuman,
) -> None:
    await start_bridge(**{"homeserver.address": proxy.url})
    human = await new_human()
    remote_id, ghost_id = _contact()
    proxy.replace("POST", "/createRoom", 500, {"errcode": "M_UNKNOWN", "error": "lost"})
    status, body = await _send(platform, remote_id, human.user_id, "m1", "hello")
    assert (status, body["errcode"]) == (502, "DMBRIDGE_HOMESERVER_ERROR"), body
    [made] = proxy.created
    assert await _ghost_rooms(homeserver, ghost_id) == []
    synced = await human.client.sync(timeout=500)
    assert isinstance(synced, SyncResponse), synced
    assert made not in synced.rooms.invite  # the invite was withdrawn

    status, body = await _send(platform, remote_id, human.user_id, "m1", "hello")
    assert (status, body["room_created"]) == (200, True), body
    assert body["room_id"] != made
    assert await _ghost_rooms(homeserver, ghost_id) == [body["room_id"]]
    await human.wait_invite(body["room_id"])
