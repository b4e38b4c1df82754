"""A real Synapse for the whole session; a bridge and human clients for each test."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mautrix.types import RoomID, UserID
from nio import AsyncClient, LoginResponse

from dmbridge.bridge import Bridge
from dmbridge.config import Settings, write_registration
from dmbridge.localhs import LocalSynapse, ensure_synapse, free_port
from tests.support.matrix import Human
from tests.support.settings import make_settings

DOMAIN = "localhost"
PASSWORD = "correct horse battery staple"



class Homeserver:
    """The session's Synapse, plus what a test needs to talk to it directly."""

    def __init__(self, synapse: LocalSynapse, bridge_port: int, folder: Path) -> None:
        self.synapse = synapse
        self.url = synapse.base_url
        self.bridge_port = bridge_port
        self.folder = folder

    def settings(self, db_url: str, folder: Path, **overrides: Any) -> Settings:
        return make_settings(folder, homeserver_url=self.url, domain=DOMAIN,
                             port=self.bridge_port, db_url=db_url, **overrides)


@pytest.fixture(scope="session")
def homeserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Homeserver]:
    folder = tmp_path_factory.mktemp("synapse")
    bridge_port = free_port()
    synapse = LocalSynapse(folder / "hs", server_name=DOMAIN,
                           registration_files=[folder / "registration.yaml"],
                           python=ensure_synapse())
    hs = Homeserver(synapse, bridge_port, folder)
    # The registration depends only on tokens, namespaces and the bridge's URL: one for all tests.
    write_registration(hs.settings("sqlite:///unused.db", folder / "reg"),
                       folder / "registration.yaml")
    synapse.start()
    yield hs
    synapse.stop()


BridgeFactory = Callable[..., Awaitable[Bridge]]
NewHuman = Callable[[], Awaitable[Human]]


@asynccontextmanager
async def bridges_on(homeserver: Homeserver, db_url: str, folder: Path
                     ) -> AsyncIterator[BridgeFactory]:
    """Start bridges against ``homeserver`` on this database; all stopped on the way out."""
    running: list[Bridge] = []

    async def start(**overrides: Any) -> Bridge:
        bridge = Bridge(homeserver.settings(db_url, folder / "bridge", **overrides))
        await bridge.start()
        running.append(bridge)
        return bridge

    yield start
    await asyncio.sleep(0.3)  # let the homeserver deliver what is in flight before we go
    for bridge in running:
        if bridge.appservice.runner is not None and bridge.appservice._http_session is not None:
            await bridge.stop()


@pytest.fixture
async def start_bridge(
    homeserver: Homeserver, db_url: str, tmp_path: Path
) -> AsyncIterator[BridgeFactory]:
    """Start a bridge on this test's database; call again after stopping one to restart."""
    async with bridges_on(homeserver, db_url, tmp_path) as start:
        yield start


@pytest.fixture
async def bridge(start_bridge: BridgeFactory) -> Bridge:
    return await start_bridge()


@asynccontextmanager
async def humans_on(homeserver: Homeserver) -> AsyncIterator[NewHuman]:
    """Register and log in Matrix users (nio clients) on ``homeserver``; closed on the way out."""
    clients: list[AsyncClient] = []

    async def make() -> Human:
        localpart = f"human-{uuid.uuid4().hex[:8]}"
        user_id = await asyncio.to_thread(homeserver.synapse.register_user, localpart, PASSWORD)
        client = AsyncClient(homeserver.url, user_id)
        resp = await client.login(PASSWORD)
        assert isinstance(resp, LoginResponse), resp
        clients.append(client)
        return Human(client)

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def new_human(homeserver: Homeserver) -> AsyncIterator[Callable[[], Awaitable[Human]]]:
    async with humans_on(homeserver) as make:
        yield make


class Platform:
    """A platform calling the bridge's HTTP API, as an integrator's code would."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}/_dmbridge/v1"

    async def call(self, method: str, path: str, token: str | None, *, json: Any = None,
                   data: bytes | None = None, params: dict[str, str] | None = None,
                   ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(method, self.base + path, json=json, data=data,
                                        params=params, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def send(self, network: str, token: str, message_id: str, **body: Any
                   ) -> tuple[int, Any]:
        return await self.call("PUT", f"/networks/{network}/messages/{message_id}", token,
                               json=body)


@pytest.fixture
async def platform(homeserver: Homeserver) -> AsyncIterator[Platform]:
    async with aiohttp.ClientSession() as session:
        yield Platform(session, homeserver.bridge_port)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 30.0,
                   what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout} s")
        await asyncio.sleep(0.1)


async def bridge_sees(bridge: Bridge, room_id: str, user_id: str, membership: str) -> None:
    """Wait until the bridge has recorded this membership from the homeserver's transactions."""
    async def recorded() -> bool:
        return await bridge.stores.members.get(RoomID(room_id), UserID(user_id)) == membership

    await wait_for(recorded, what=f"the bridge to record {user_id} as {membership} in {room_id}")


async def accept_dm(human: Human, room_id: str, bridge: Bridge | None) -> None:
    """The human accepts the ghost's invite; with a ``bridge``, until it has recorded the join."""
    await human.wait_invite(room_id)
    await human.join(room_id)
    if bridge is not None:
        await bridge_sees(bridge, room_id, human.user_id, "join")
