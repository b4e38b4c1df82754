"""Several bridge workers on one database: what one does, the others respect.

Workers here are Bridge objects in the test's process (or `dmbridge run` processes), each
listening on a port of its own (the homeserver's registration names the first one's); a test
posts what a load balancer would have sent to another worker itself.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from mautrix.types import RoomID, UserID
from nio import RoomMessagesResponse

from dmbridge.bridge import Bridge
from dmbridge.db.dm import ACTIVE, JOINING
from dmbridge.localhs import free_port
from dmbridge.payloads import DM_STARTED
from dmbridge.peers import INVITES, OUTBOX
from tests.integration.conftest import (
    DOMAIN,
    Homeserver,
    NewHuman,
    Platform,
    accept_dm,
    bridges_on,
    wait_for,
)
from tests.support.feed import Feed
from tests.support.matrix import Human
from tests.support.process import BridgeProcess
from tests.support.settings import AS_TOKEN, CHAT_TOKEN, HS_TOKEN, make_settings

pytestmark = pytest.mark.integration



@pytest.fixture
def pg_url(db_url: str) -> str:
    """Workers share a database only on PostgreSQL (SQLite refuses a second one)."""
    if db_url.startswith("sqlite"):
        pytest.skip("several workers need PostgreSQL")
    return db_url


class Workers:
    """Two bridges on one database, and a platform client for each."""

    def __init__(self, bridges: list[Bridge], platforms: list[Platform]) -> None:
        self.bridges = bridges
        self.platforms = platforms


@pytest.fixture
async def workers(homeserver: Homeserver, pg_url: str, tmp_path: Path
                  ) -> AsyncIterator[Workers]:
    ports = [homeserver.bridge_port, free_port()]
    async with AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        bridges = []
        for i, port in enumerate(ports):
            start = await stack.enter_async_context(
                bridges_on(homeserver, pg_url, tmp_path / f"worker{i}"))
            bridges.append(await start(**{"appservice.port": port}))
        yield Workers(bridges, [Platform(session, port) for port in ports])


def _contact() -> tuple[str, str]:
    remote_id = f"c{uuid.uuid4().hex[:10]}"
    return remote_id, f"@dm_chat_{remote_id}:{DOMAIN}"


async def _joined_rooms(homeserver: Homeserver, user_id: str) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(
        f"{homeserver.url}/_matrix/client/v3/joined_rooms",
        params={"user_id": user_id}, headers={"Authorization": f"Bearer {AS_TOKEN}"},
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return list(body["joined_rooms"])


async def test_first_messages_from_a_new_contact_through_two_workers_at_once(
    homeserver: Homeserver, workers: Workers, new_human: NewHuman, pg_url: str,
) -> None:
    """Both platform requests are answered 200, with one ghost and one room between them."""
    await _first_contacts(homeserver, workers.platforms, pg_url, await new_human())


async def test_first_messages_through_two_worker_processes_at_once(
    homeserver: Homeserver, pg_url: str, tmp_path: Path, new_human: NewHuman,
) -> None:
    """The same with two `dmbridge run` processes; both stop cleanly afterwards."""
    ports = [homeserver.bridge_port, free_port()]
    processes = []
    for i, port in enumerate(ports):
        folder = tmp_path / f"process{i}"
        make_settings(folder, homeserver_url=homeserver.url, domain=DOMAIN, port=port,
                      db_url=pg_url)
        processes.append(BridgeProcess(folder / "config.yaml", folder / "bridge.log"))
    async with processes[0], processes[1], aiohttp.ClientSession() as session:
        for process, port in zip(processes, ports, strict=True):
            process.start()  # the first one first: the homeserver pings it for both
            await process.wait_ready(port)
        await _first_contacts(homeserver, [Platform(session, port) for port in ports], pg_url,
                              await new_human())
        for process in processes:
            assert await process.terminate() == 0, process.log_tail()


async def _first_contacts(homeserver: Homeserver, platforms: list[Platform], pg_url: str,
                          human: Human) -> None:
    """New contacts' first messages to ``human``, each sent through every worker at once."""
    contacts = [_contact() for _ in range(4)]
    sends = [
        platform.send("chat", CHAT_TOKEN, f"m{n}", sender=remote_id, sender_name="Carol",
                      recipient=human.user_id, text=f"hello {n}")
        for remote_id, _ in contacts
        for n, platform in enumerate(platforms)
    ]
    answers = await asyncio.gather(*sends)
    assert [status for status, _ in answers] == [200] * len(sends), answers
    conn = await asyncpg.connect(pg_url)
    try:
        for i, (remote_id, ghost_id) in enumerate(contacts):
            first, second = answers[2 * i][1], answers[2 * i + 1][1]
            assert first["room_id"] == second["room_id"]
            assert sorted([first["room_created"], second["room_created"]]) == [False, True]
            assert await conn.fetchval("SELECT COUNT(*) FROM ghost WHERE remote_id=$1",
                                       remote_id) == 1
            assert await _joined_rooms(homeserver, ghost_id) == [first["room_id"]]
    finally:
        await conn.close()


def _tee_transactions(workers: Workers) -> None:
    """The homeserver's transactions reach the first worker (the registration names it): each
    goes to the second at the same moment, as a balancer retrying on another worker would."""
    first, second = workers.bridges
    handle = first.matrix.handle_transaction
    url = f"http://127.0.0.1:{second.settings.port}/_matrix/app/v1/transactions"
    session = workers.platforms[1].session

    async def post(txn_id: str, events: list[Any]) -> None:
        async with session.put(f"{url}/{txn_id}", json={"events": events},
                               headers={"Authorization": f"Bearer {HS_TOKEN}"}) as resp:
            assert resp.status == 200, await resp.text()

    async def both(txn_id: str, events: list[Any], ephemeral: list[Any] | None = None, *,
                   untrusted: bool = True) -> None:
        await asyncio.gather(handle(txn_id, events, ephemeral, untrusted=untrusted),
                             post(txn_id, events))

    first.matrix.handle_transaction = both  # type: ignore[method-assign]


async def test_an_invite_both_workers_receive_is_answered_once(
    workers: Workers, new_human: NewHuman, caplog: pytest.LogCaptureFixture,
) -> None:
    """One join, one DM, one history of it: the worker that records the invite wakes the other
    at once, and only the one holding the invite's lease answers it."""
    _tee_transactions(workers)
    human = await new_human()
    _, ghost_id = _contact()
    room_id = await human.create_dm(ghost_id)
    await human.wait_membership(room_id, ghost_id, "join")
    first = workers.bridges[0]

    async def settled() -> bool:
        dm = await first.stores.dms.get_by_room(RoomID(room_id))
        return dm is not None and dm.state == ACTIVE and not await first.stores.invites.all()

    await wait_for(settled, what="the DM to be active and the invite answered")
    # Whichever worker recorded it, the other heard of it (and so looked for invites).
    await wait_for(lambda: _heard(workers, INVITES), what="a worker to hear of the invite")
    history = await first.stores.history.of_pair(ghost_id, human.user_id)
    assert [(t.room_id, t.state, t.reason) for t in history] == [
        (room_id, JOINING, "user_invited"), (room_id, ACTIVE, "user_invited")]
    rows = await first.db.fetch("SELECT room_id, state FROM dm WHERE ghost_id=$1", ghost_id)
    assert [(r["room_id"], r["state"]) for r in rows] == [(room_id, ACTIVE)]
    joined = [r for r in caplog.records if r.getMessage().startswith(
        f"{ghost_id} joined {room_id} at the invite")]
    assert len(joined) == 1, [r.getMessage() for r in joined]
    timeline = await human.client.room_messages(room_id, start="", limit=100)
    assert isinstance(timeline, RoomMessagesResponse), timeline
    joins = [e.source for e in timeline.chunk if e.source["type"] == "m.room.member"
             and e.source["state_key"] == ghost_id]
    assert [e["content"]["membership"] for e in joins] == ["join", "invite"]  # newest first
    assert await first.db.fetchval(
        "SELECT COUNT(*) FROM outbox WHERE type=$1 AND payload LIKE $2", DM_STARTED,
        f"%{room_id}%") == 1


async def _heard(workers: Workers, channel: str) -> bool:
    return any(bridge.peers.heard[channel] for bridge in workers.bridges)


async def test_a_message_queued_by_one_worker_wakes_another_workers_long_poll(
    workers: Workers, new_human: NewHuman, caplog: pytest.LogCaptureFixture,
) -> None:
    """The human's reply reaches the first worker (the homeserver's); the platform long-polls
    the second, which hears of the new item from PostgreSQL rather than finding it later."""
    first, second = workers.bridges
    human = await new_human()
    remote_id, _ = _contact()
    status, body = await workers.platforms[0].send(
        "chat", CHAT_TOKEN, "m1", sender=remote_id, recipient=human.user_id, text="hi")
    assert status == 200, body
    room_id = body["room_id"]
    await accept_dm(human, room_id, first)
    feed = Feed(workers.platforms[1])
    await feed.pull(wait=0)  # what opening the DM queued, acknowledged
    heard = second.peers.heard[OUTBOX]
    caplog.set_level(logging.DEBUG, logger="dmbridge.peers")
    caplog.clear()
    polling = asyncio.create_task(feed.pull(wait=30))
    await asyncio.sleep(0)
    event_id = await human.say(room_id, "hello from Matrix")
    await polling
    got = await feed.expect("message", room_id=room_id, timeout=30)
    assert got["message"]["event_id"] == event_id
    assert second.peers.heard[OUTBOX] > heard
    assert any(r.name == "dmbridge.peers" and r.getMessage().startswith(
        "woken by another worker") and "dmbridge_outbox chat" in r.getMessage()
        for r in caplog.records)


async def test_rooms_two_workers_list_for_one_ghost_at_once_all_stay_in_its_m_direct(
    homeserver: Homeserver, workers: Workers, new_human: NewHuman,
) -> None:
    """Each worker reads, merges and writes the ghost's m.direct; taking turns across workers,
    neither writes over a room the other has just listed."""
    human = await new_human()
    remote_id, ghost_id = _contact()
    status, body = await workers.platforms[0].send(
        "chat", CHAT_TOKEN, "m1", sender=remote_id, recipient=human.user_id, text="hi")
    assert status == 200, body
    listed = {
        (bridge, UserID(f"@someone{w}x{n}:{DOMAIN}"), RoomID(f"!room{w}x{n}:{DOMAIN}"))
        for w, bridge in enumerate(workers.bridges) for n in range(6)
    }
    await asyncio.gather(*(bridge.dms.add_to_m_direct(UserID(ghost_id), user_id, room_id)
                           for bridge, user_id, room_id in listed))
    async with aiohttp.ClientSession() as session, session.get(
        f"{homeserver.url}/_matrix/client/v3/user/{ghost_id}/account_data/m.direct",
        params={"user_id": ghost_id}, headers={"Authorization": f"Bearer {AS_TOKEN}"},
    ) as resp:
        direct = await resp.json()
        assert resp.status == 200, direct
    assert direct[human.user_id] == [body["room_id"]]
    assert {(user_id, room_id) for _, user_id, room_id in listed} == {
        (user_id, room_id) for user_id, rooms in direct.items() if user_id != human.user_id
        for room_id in rooms}
