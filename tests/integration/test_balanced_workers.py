"""Three `dmbridge run` workers on one PostgreSQL database behind nginx, one killed under load.

nginx runs with the configuration shipped in contrib/nginx/dmbridge.conf (ports of this run put
in) and listens where the homeserver's registration points, so the homeserver's transactions
and the platform's calls both reach whichever worker nginx picks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from nio import SyncResponse

from dmbridge.localhs import free_port
from tests.conftest import REQUIRE_ALL
from tests.integration.conftest import DOMAIN, Homeserver, NewHuman, Platform
from tests.integration.test_workers import _joined_rooms
from tests.support.matrix import Human
from tests.support.nginx import NGINX, Nginx
from tests.support.process import BridgeProcess
from tests.support.settings import CHAT_TOKEN, make_settings

pytestmark = pytest.mark.integration

WORKERS = 3
HUMANS = 10
CONTACTS_PER_HUMAN = 3
MESSAGES_PER_PAIR = 5  # 10 humans x 3 contacts x 5 = 150 messages, and one reply per pair
# Answers the platform sends again: the worker that had the request died and nginx did not send
# it on (a POST), the request met the bridge busy (503) or over its quota (429).
RETRIED = frozenset({429, 502, 503, 504})
ATTEMPTS = 30


@pytest.fixture
def nginx_installed() -> None:
    if not NGINX.is_file():
        if REQUIRE_ALL:
            pytest.fail(f"nginx is not installed ({NGINX}; apt-get install nginx)")
        pytest.skip("nginx is not installed")


@pytest.fixture
def pg_url(db_url: str) -> str:
    if db_url.startswith("sqlite"):
        pytest.skip("several workers need PostgreSQL")
    return db_url


class BalancedPlatform(Platform):
    """The platform's client: what nginx could not hand to a live worker is sent again.

    Every call is safe to repeat: a message by its message ID, an acknowledgement by the
    events' IDs, a pull by its cursor.
    """

    async def call(self, method: str, path: str, token: str | None, *, json: Any = None,
                   data: bytes | None = None, params: dict[str, str] | None = None,
                   ) -> tuple[int, Any]:
        got: tuple[int, Any] | str = "never called"
        for attempt in range(ATTEMPTS):
            try:
                got = await super().call(method, path, token, json=json, data=data,
                                         params=params)
            except aiohttp.ClientConnectionError as e:
                got = repr(e)
            if not isinstance(got, str) and got[0] not in RETRIED:
                return got
            await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt))
        raise AssertionError(f"{method} {path}: still {got} after {ATTEMPTS} attempts")


class Pair:
    def __init__(self, human: Human) -> None:
        self.human = human
        self.remote_id = f"c{uuid.uuid4().hex[:10]}"
        self.ghost_id = f"@dm_chat_{self.remote_id}:{DOMAIN}"
        self.texts = [f"{self.remote_id} says {n}" for n in range(MESSAGES_PER_PAIR)]
        self.reply = f"{self.human.user_id} answers {self.remote_id}"
        self.room_id = ""

    async def send(self, platform: Platform, n: int) -> None:
        status, body = await platform.send(
            "chat", CHAT_TOKEN, f"{self.remote_id}-{n}", sender=self.remote_id,
            sender_name=f"Contact {self.remote_id}", recipient=self.human.user_id,
            text=self.texts[n])
        assert status == 200, body
        assert self.room_id in ("", body["room_id"]), (self.room_id, body)
        self.room_id = body["room_id"]


async def test_three_workers_behind_nginx_lose_nothing_when_one_is_killed(
    homeserver: Homeserver, pg_url: str, tmp_path: Path, new_human: NewHuman,
    nginx_installed: None,
) -> None:
    ports = [free_port() for _ in range(WORKERS)]
    # Where the registration sends the homeserver: every request now goes through nginx.
    balancer = Nginx(tmp_path / "nginx", homeserver.bridge_port, ports)
    workers = []
    for i, port in enumerate(ports):
        folder = tmp_path / f"worker{i}"
        make_settings(folder, homeserver_url=homeserver.url, domain=DOMAIN, port=port,
                      db_url=pg_url, **{"appservice.address": balancer.url})
        workers.append(BridgeProcess(folder / "config.yaml", folder / "bridge.log"))
    async with balancer, workers[0], workers[1], workers[2], aiohttp.ClientSession() as session:
        await balancer.start()
        for worker in workers:
            worker.start()  # all at once: one creates the schema, the others wait for it
        for worker, port in zip(workers, ports, strict=True):
            await worker.wait_ready(port)
        platform = BalancedPlatform(session, balancer.listen_port)
        humans = [await new_human() for _ in range(HUMANS)]
        pairs = [Pair(human) for human in humans for _ in range(CONTACTS_PER_HUMAN)]

        # Each pair's first message opens its DM; the humans accept.
        await _limited([pair.send(platform, 0) for pair in pairs])
        await asyncio.gather(*(_accept(human, [p for p in pairs if p.human is human])
                               for human in humans))

        # The rest of each conversation, in order, with the human's reply in the middle; one
        # worker is killed once half of these messages have been answered.
        answered = 0
        half = asyncio.Event()
        reply_ids: dict[str, str] = {}

        async def talk(pair: Pair) -> None:
            nonlocal answered
            for n in range(1, MESSAGES_PER_PAIR):
                await pair.send(platform, n)
                answered += 1
                if answered * 2 >= len(pairs) * (MESSAGES_PER_PAIR - 1):
                    half.set()
                if n == 2:
                    reply_ids[await pair.human.say(pair.room_id, pair.reply)] = pair.reply

        async def kill_midway() -> None:
            await half.wait()
            assert await workers[1].kill() == -9

        await asyncio.gather(kill_midway(), _limited([talk(pair) for pair in pairs]))

        received = await _pull_replies(platform, expected=len(pairs))
        conn = await asyncpg.connect(pg_url)
        try:
            rows = await conn.fetch("SELECT ghost_id, user_id, room_id FROM dm")
        finally:
            await conn.close()
        served = Counter(address.rsplit(":", 1)[1] for address in balancer.upstreams())
        met_dead = [line for line in balancer.error_log.read_text().splitlines()
                    if f"upstream: \"http://127.0.0.1:{ports[1]}/" in line]
        for worker in (workers[0], workers[2]):
            assert await worker.terminate() == 0, worker.log_tail()

    # The platform got every reply once, each from its DM.
    by_room = {pair.room_id: pair for pair in pairs}
    assert Counter(e["message"]["event_id"] for e in received) == Counter(reply_ids.keys())
    assert sorted((e["room_id"], e["message"]["text"]) for e in received) == sorted(
        (pair.room_id, pair.reply) for pair in pairs)
    # One room per pair, the one every message went to; no other room, no other invite.
    assert len(by_room) == len(pairs)
    assert sorted((r["ghost_id"], r["user_id"], r["room_id"]) for r in rows) == sorted(
        (pair.ghost_id, pair.human.user_id, pair.room_id) for pair in pairs)
    for human in humans:
        mine = sorted(p.room_id for p in pairs if p.human is human)
        joined = await human.client.joined_rooms()
        assert sorted(joined.rooms) == mine  # type: ignore[union-attr]
        assert sorted(human.invites) == mine
        assert isinstance(await human.client.sync(timeout=0), SyncResponse)
        assert dict(human.client.invited_rooms) == {}  # no second room waits to be accepted
    # Each human's client shows each conversation whole, in order, each message once.
    for pair in pairs:
        shown = [(e["sender"], e["content"]["body"]) for e in await pair.human.messages(
            pair.room_id)]
        assert shown == [(pair.ghost_id, text) for text in pair.texts[:3]] + [
            (pair.human.user_id, pair.reply)] + [
            (pair.ghost_id, text) for text in pair.texts[3:]], pair.room_id
        assert await _joined_rooms(homeserver, pair.ghost_id) == [pair.room_id]
    # Every worker served requests through nginx, which then found the killed one gone and
    # sent its requests on to the others.
    assert set(served) == {str(port) for port in ports}, served
    assert met_dead, "nginx never tried the killed worker after it died"


async def _limited(calls: list[Any], at_once: int = 8) -> None:
    gate = asyncio.Semaphore(at_once)

    async def one(call: Any) -> None:
        async with gate:
            await call

    await asyncio.gather(*(one(call) for call in calls))


async def _accept(human: Human, pairs: list[Pair]) -> None:
    rooms = {pair.room_id for pair in pairs}
    await human.sync_until(lambda: rooms <= set(human.invites), timeout=60)
    for room_id in sorted(rooms):
        await human.join(room_id)


async def _pull_replies(platform: Platform, expected: int, timeout: float = 120.0
                        ) -> list[dict[str, Any]]:
    """Every message event the platform is handed (and acknowledges) until ``expected`` came,
    then once more: a duplicate would come in that last pull."""
    path = "/networks/chat/events"
    received: list[dict[str, Any]] = []
    after = "0"
    deadline = time.monotonic() + timeout
    extra = 1
    while extra >= 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(received)} of {expected} replies after {timeout} s")
        status, body = await platform.call("GET", path, CHAT_TOKEN,
                                           params={"after": after, "wait": "2"})
        assert status == 200, body
        received.extend(e for e in body["events"] if e["type"] == "message")
        after = str(body["next_after"])
        if body["events"]:
            status, ack = await platform.call("POST", path + "/ack", CHAT_TOKEN,
                                              json={"ids": [e["id"] for e in body["events"]]})
            assert status == 200, ack
        if len(received) >= expected:
            extra -= 1
    return received
