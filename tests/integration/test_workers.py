"""Several bridge workers on one database: what one does, the others respect.

Workers here are Bridge objects in the test's process, each listening on a port of its own
(the homeserver's registration names the first one's); a test posts what a load balancer would
have sent to another worker itself.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest

from dmbridge.bridge import Bridge
from dmbridge.localhs import free_port
from tests.integration.conftest import (
    DOMAIN,
    Homeserver,
    Platform,
    bridges_on,
)
from tests.support.matrix import Human
from tests.support.settings import AS_TOKEN, CHAT_TOKEN

pytestmark = pytest.mark.integration

NewHuman = Callable[[], Awaitable[Human]]


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
    homeserver: Homeserver, workers: Workers, new_human: NewHuman,
) -> None:
    """Both platform requests are answered 200, with one ghost and one room between them."""
    human = await new_human()
    contacts = [_contact() for _ in range(4)]
    sends = [
        platform.send("chat", CHAT_TOKEN, f"m{n}", sender=remote_id, sender_name="Carol",
                      recipient=human.user_id, text=f"hello {n}")
        for remote_id, _ in contacts
        for n, platform in enumerate(workers.platforms)
    ]
    answers = await asyncio.gather(*sends)
    assert [status for status, _ in answers] == [200] * len(sends), answers
    db = workers.bridges[0].db
    for i, (remote_id, ghost_id) in enumerate(contacts):
        first, second = answers[2 * i][1], answers[2 * i + 1][1]
        assert first["room_id"] == second["room_id"]
        assert sorted([first["room_created"], second["room_created"]]) == [False, True]
        assert await db.fetchval("SELECT COUNT(*) FROM ghost WHERE remote_id=$1",
                                 remote_id) == 1
        assert await _joined_rooms(homeserver, ghost_id) == [first["room_id"]]
