"""`dmbridge forget` against a real Synapse, with the bridge running and a pull network."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from dmbridge.bridge import Bridge
from tests.integration.conftest import Homeserver, NewHuman, Platform, accept_dm
from tests.support.feed import Feed
from tests.support.matrix import Human
from tests.support.settings import AS_TOKEN, CHAT_TOKEN

NET = "chat"


async def _dmbridge(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dmbridge", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _conversation(bridge: Bridge, platform: Platform, feed: Feed, human: Human,
                        contact: str) -> str:
    """The platform writes, the human joins and answers, the platform replies to that."""
    status, first = await platform.send(NET, CHAT_TOKEN, uuid.uuid4().hex, sender=contact,
                                        sender_name="Parcel Service", recipient=human.user_id,
                                        text="hello")
    assert status == 200, first
    room_id: str = first["room_id"]
    await accept_dm(human, room_id, bridge)
    await human.say(room_id, "hi, who is this?")
    answer = await feed.expect("message", room_id=room_id)
    status, reply = await platform.send(
        NET, CHAT_TOKEN, uuid.uuid4().hex, sender=contact, recipient=human.user_id,
        text="your parcel service", reply_to={"event_id": answer["message"]["event_id"]})
    assert status == 200, reply
    return room_id


async def _kept(bridge: Bridge, sql: str, *args: object) -> int:
    return int(await bridge.stores.db.fetchval(sql, *args))


async def test_forgetting_a_matrix_user_and_a_remote_user(
        bridge: Bridge, platform: Platform, new_human, tmp_path: Path) -> None:
    config = str(tmp_path / "bridge" / "config.yaml")
    feed = Feed(platform)
    alice, bob = await new_human(), await new_human()
    ann, ben = f"a{uuid.uuid4().hex[:10]}", f"b{uuid.uuid4().hex[:10]}"
    alice_room = await _conversation(bridge, platform, feed, alice, ann)
    bob_room = await _conversation(bridge, platform, feed, bob, ben)
    ann_ghost = bridge.settings.networks.get(NET).ghost_user_id(ann)
    ben_ghost = bridge.settings.networks.get(NET).ghost_user_id(ben)

    # Without --yes and nobody to answer, nothing happens.
    code, out, _ = await _dmbridge("forget", "-c", config, "--matrix-user", alice.user_id)
    assert code == 1 and "nothing was changed" in out
    assert await _kept(bridge, "SELECT COUNT(*) FROM dm WHERE user_id=$1", alice.user_id) == 1

    code, out, err = await _dmbridge("forget", "-c", config, "--matrix-user", alice.user_id,
                                     "--yes")
    assert code == 0, (out, err)
    assert f"the ghost left 1 room(s): {alice_room}" in out
    assert "sent_message 2" in out and "matrix_message 1" in out, out
    forgotten = await feed.expect("dm.forgotten", room_id=alice_room)
    assert (forgotten["remote_id"], forgotten["user_id"], forgotten["dm"]["reason"]) == (
        ann, alice.user_id, "forgotten_by_admin")
    await alice.wait_membership(alice_room, ann_ghost, "leave")  # Alice sees the ghost leave
    for table in ("dm", "dm_history", "matrix_message", "outbox"):
        where = "user_id=$1" + (" AND type<>'dm.forgotten'" if table == "outbox" else "")
        assert await _kept(bridge, f"SELECT COUNT(*) FROM {table} WHERE {where}",
                           alice.user_id) == 0, table
    for table in ("sent_message", "room_member", "mx_user_profile"):
        assert await _kept(bridge, f"SELECT COUNT(*) FROM {table} WHERE room_id=$1",
                           alice_room) == 0, table
    # Bob's DM is untouched.
    assert await _kept(bridge, "SELECT COUNT(*) FROM sent_message WHERE room_id=$1",
                       bob_room) == 2

    code, out, err = await _dmbridge("forget", "-c", config, "--network", NET, "--remote-id",
                                     ben, "--yes")
    assert code == 0, (out, err)
    await feed.expect("dm.forgotten", room_id=bob_room)
    await bob.wait_membership(bob_room, ben_ghost, "leave")
    assert await bridge.stores.ghosts.get(ben_ghost) is None
    profile = await bob.client.get_profile(ben_ghost)
    assert (profile.displayname, profile.avatar_url) == (f"{ben} (Chat)", None), profile
    assert await _kept(bridge, "SELECT COUNT(*) FROM room_member WHERE user_id=$1",
                       ben_ghost) == 0
    for table in ("sent_message", "matrix_message", "dm", "dm_history"):
        assert await _kept(bridge, f"SELECT COUNT(*) FROM {table} WHERE remote_id=$1",
                           ben) == 0, table

    # Forgotten is forgotten: a second run knows nobody, in one line.
    code, out, err = await _dmbridge("forget", "-c", config, "--network", NET, "--remote-id",
                                     ben, "--yes")
    assert code == 1 and err == f"dmbridge: the bridge knows nothing of {NET} user {ben}:" \
        " no DM, no ghost\n", err


async def _m_direct(homeserver: Homeserver, ghost_id: str, put: Any = None) -> Any:
    """The ghost's m.direct account data as the homeserver has it (or written, with ``put``)."""
    url = (f"{homeserver.url}/_matrix/client/v3/user/{quote(ghost_id, safe='')}"
           "/account_data/m.direct")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {AS_TOKEN}"}) as s, \
            s.request("GET" if put is None else "PUT", url, params={"user_id": ghost_id},
                      json=put) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return body


async def test_forgetting_a_matrix_user_takes_their_room_off_the_ghosts_m_direct(
        bridge: Bridge, platform: Platform, homeserver: Homeserver, new_human: NewHuman,
        tmp_path: Path) -> None:
    """The ghost's other DMs, and entries the bridge did not write, stay listed."""
    config = str(tmp_path / "bridge" / "config.yaml")
    alice, bob = await new_human(), await new_human()
    contact = f"a{uuid.uuid4().hex[:10]}"
    ghost_id = bridge.settings.networks.get(NET).ghost_user_id(contact)
    rooms = {}
    for human in (alice, bob):
        status, body = await platform.send(NET, CHAT_TOKEN, uuid.uuid4().hex, sender=contact,
                                           recipient=human.user_id, text="hello")
        assert status == 200, body
        rooms[human.user_id] = body["room_id"]
    listed = await _m_direct(homeserver, ghost_id)
    assert listed == {alice.user_id: [rooms[alice.user_id]], bob.user_id: [rooms[bob.user_id]]}
    await _m_direct(homeserver, ghost_id, {**listed, "@carol:elsewhere": ["!kept"]})

    code, out, err = await _dmbridge("forget", "-c", config, "--matrix-user", alice.user_id,
                                     "--yes")
    assert code == 0, (out, err)
    assert await _m_direct(homeserver, ghost_id) == {
        bob.user_id: [rooms[bob.user_id]], "@carol:elsewhere": ["!kept"]}
