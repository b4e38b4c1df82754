"""Rate limits against a real Synapse that enforces them, and per-network quotas.

A second Synapse, with low ``rc_message`` / ``rc_room_creation`` / ``rc_invites`` and a
registration with ``rate_limited: true``, runs for this module's session on its own port.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ruamel.yaml import YAML

from dmbridge.config import write_registration
from dmbridge.localhs import LocalSynapse, ensure_synapse, free_port
from tests.integration.conftest import (
    DOMAIN,
    BridgeFactory,
    Homeserver,
    Platform,
    bridges_on,
    humans_on,
    wait_for,
)
from tests.support.matrix import Human
from tests.support.settings import CHAT_TOKEN, SMS_TOKEN

# Per user (each ghost is one): a burst of 5, then 2 actions a second; createRoom counts
# against rc_message too. A ghost joins one room at once, then one every two seconds.
LOW_LIMITS = {
    "rc_joins": {"local": {"per_second": 0.5, "burst_count": 1},
                 "remote": {"per_second": 0.5, "burst_count": 1}},
    "rc_message": {"per_second": 2, "burst_count": 5},
    "rc_room_creation": {"per_second": 1, "burst_count": 5},
    "rc_invites": {
        "per_room": {"per_second": 1, "burst_count": 5},
        "per_user": {"per_second": 1, "burst_count": 5},
        "per_issuer": {"per_second": 1, "burst_count": 5},
    },
}
RECIPIENTS = 30
PLATFORM_ATTEMPTS = 40  # an integrator's bounded retry loop
MAX_RETRY_WAIT = 10.0


def _phone() -> str:
    return "+1555" + str(uuid.uuid4().int)[:7]


@pytest.fixture(scope="session")
def limited_homeserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Homeserver]:
    """A Synapse that rate-limits the bridge's ghosts, as a production homeserver may."""
    folder = tmp_path_factory.mktemp("limited-synapse")
    synapse = LocalSynapse(folder / "hs", server_name=DOMAIN, python=ensure_synapse(),
                           registration_files=[folder / "registration.yaml"],
                           rate_limits=LOW_LIMITS)
    hs = Homeserver(synapse, free_port(), folder)
    write_registration(hs.settings("sqlite:///unused.db", folder / "reg"),
                       folder / "registration.yaml")
    yaml = YAML()
    registration = yaml.load(folder / "registration.yaml")
    registration["rate_limited"] = True
    yaml.dump(registration, folder / "registration.yaml")
    synapse.start()
    yield hs
    synapse.stop()


@pytest.fixture
async def start_limited_bridge(limited_homeserver: Homeserver, db_url: str, tmp_path: Path
                               ) -> AsyncIterator[BridgeFactory]:
    async with bridges_on(limited_homeserver, db_url, tmp_path) as start:
        yield start


@pytest.fixture
async def limited_humans(limited_homeserver: Homeserver
                         ) -> AsyncIterator[Callable[[], Awaitable[Human]]]:
    async with humans_on(limited_homeserver) as make:
        yield make


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: Any) -> None:
        self.status, self.headers, self.body = status, headers, body


async def _put(session: aiohttp.ClientSession, url: str, token: str, body: dict[str, Any]
               ) -> Answer:
    async with session.put(url, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
        return Answer(r.status, dict(r.headers), await r.json(content_type=None))


async def _send_until_accepted(session: aiohttp.ClientSession, url: str, token: str,
                               body: dict[str, Any], refusals: list[Answer]) -> Answer:
    """What an integrator does: on 429, wait as Retry-After says and send the same ID again."""
    for _ in range(PLATFORM_ATTEMPTS):
        answer = await _put(session, url, token, body)
        if answer.status != 429:
            return answer
        refusals.append(answer)
        await asyncio.sleep(min(float(answer.headers.get("Retry-After", "1")), MAX_RETRY_WAIT))
    raise AssertionError(f"still refused after {PLATFORM_ATTEMPTS} attempts: {answer.body}")


async def test_a_burst_of_first_contacts_lands_once_each(
    start_limited_bridge: BridgeFactory, limited_humans: Callable[[], Awaitable[Human]],
    limited_homeserver: Homeserver, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "dmbridge.ratelimit")
    bridge = await start_limited_bridge(**{"rate_limits.request_wait": 5})
    humans = await asyncio.gather(*(limited_humans() for _ in range(RECIPIENTS)))
    phone = _phone()
    ghost = f"@dm_sms_=2b{phone[1:]}:{DOMAIN}"
    base = f"http://127.0.0.1:{limited_homeserver.bridge_port}/_dmbridge/v1/networks/sms"
    refusals: list[Answer] = []
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(
            _send_until_accepted(session, f"{base}/messages/first-{i}", SMS_TOKEN,
                                 {"sender": phone, "recipient": human.user_id,
                                  "text": f"hello {i}"}, refusals)
            for i, human in enumerate(humans)
        ))

    assert [a.status for a in answers] == [200] * RECIPIENTS, [a.body for a in answers]
    for refusal in refusals:  # never a 5xx; every 429 says when to come back
        assert int(refusal.headers["Retry-After"]) >= 1, refusal.headers
        assert refusal.body["errcode"] == "M_LIMIT_EXCEEDED", refusal.body
        assert refusal.body["retry_after_ms"] > 0
    # Synapse did rate-limit (more createRoom requests than rooms), and the log says so.
    assert bridge.requests.by_endpoint["POST /_matrix/client/v3/createRoom"] > RECIPIENTS
    assert any("the homeserver rate-limits POST /_matrix/client/v3/" in r.getMessage()
               for r in caplog.records)

    semaphore = asyncio.Semaphore(6)

    async def sees_one_dm_and_one_message(i: int, human: Human, answer: Answer) -> None:
        async with semaphore:
            await human.sync_until(lambda: bool(human.invites), timeout=60)
            from_ghost = [room for room, events in human.invites.items()
                          if any(e.sender == ghost for e in events)]
            assert from_ghost == [answer.body["room_id"]], (human.user_id, human.invites)
            await human.join(answer.body["room_id"])
            messages = await human.wait_messages(answer.body["room_id"], 1)
            assert [m["content"]["body"] for m in messages] == [f"hello {i}"]
            assert messages[0]["sender"] == ghost

    await asyncio.gather(*(sees_one_dm_and_one_message(i, h, a)
                           for i, (h, a) in enumerate(zip(humans, answers, strict=True))))


async def test_invites_to_a_ghost_are_answered_through_join_limits(
    start_limited_bridge: BridgeFactory, limited_humans: Callable[[], Awaitable[Human]],
) -> None:
    """Background work waits out the homeserver's limits instead of failing: several users
    invite the same ghost at once, and it joins every room as their DM."""
    bridge = await start_limited_bridge()
    humans = await asyncio.gather(*(limited_humans() for _ in range(4)))
    ghost = f"@dm_chat_carol-{uuid.uuid4().hex[:6]}:{DOMAIN}"
    rooms = await asyncio.gather(*(human.create_dm(ghost) for human in humans))
    for human, room_id in zip(humans, rooms, strict=True):
        await human.wait_membership(room_id, ghost, "join", timeout=90)
    joins = bridge.requests.by_endpoint["POST /_matrix/client/v3/rooms/{id}/join"]
    assert joins > len(rooms), "the homeserver rate-limited some joins, and they were retried"
    for human, room_id in zip(humans, rooms, strict=True):
        async def adopted(user_id: str = human.user_id, room_id: str = room_id) -> bool:
            dms = await bridge.dms.list_dms(network_id="chat", user_id=user_id)
            return [dm.room_id for dm in dms] == [room_id]

        await wait_for(adopted, what=f"{room_id} to be the DM of {human.user_id}")


async def test_network_quotas_answer_429_with_retry_after(
    start_bridge: BridgeFactory, homeserver: Homeserver, new_human: Callable[[], Awaitable[Human]],
    platform: Platform,
) -> None:
    await start_bridge(networks={
        "sms": {"quotas": {"messages_per_second": 0.01, "message_burst": 2}},
        "chat": {"quotas": {"new_dms_per_hour": 1}},
    })
    alice, bob = await new_human(), await new_human()
    base = f"http://127.0.0.1:{homeserver.bridge_port}/_dmbridge/v1/networks"
    phone = _phone()
    async with aiohttp.ClientSession() as session:
        sent = [await _put(session, f"{base}/sms/messages/q{i}", SMS_TOKEN,
                           {"sender": phone, "recipient": alice.user_id, "text": f"m{i}"})
                for i in range(3)]
        assert [a.status for a in sent] == [200, 200, 429], [a.body for a in sent]
        refused = sent[2]
        assert refused.body["errcode"] == "DMBRIDGE_QUOTA_EXCEEDED"
        assert "may send 0.01 messages a second" in refused.body["error"]
        assert 90 <= int(refused.headers["Retry-After"]) <= 100  # one message per 100 s
        assert refused.body["retry_after_ms"] > 0

        first = await _put(session, f"{base}/chat/messages/c1", CHAT_TOKEN,
                           {"sender": "carol", "recipient": alice.user_id, "text": "hi"})
        second = await _put(session, f"{base}/chat/messages/c2", CHAT_TOKEN,
                            {"sender": "carol", "recipient": bob.user_id, "text": "hi"})
    assert first.status == 200, first.body
    assert second.status == 429, second.body
    assert second.body["errcode"] == "DMBRIDGE_QUOTA_EXCEEDED"
    assert "new_dms_per_hour" in second.body["error"]
    assert 3500 <= int(second.headers["Retry-After"]) <= 3600

    room_id = sent[0].body["room_id"]
    await alice.wait_invite(room_id)
    await alice.join(room_id)
    # Both accepted messages were in the room before the third was refused; it never is.
    texts = [m["content"]["body"] for m in await alice.wait_messages(room_id, 2)]
    assert texts == ["m0", "m1"]
    await bob.client.sync(timeout=0)
    assert not bob.client.invited_rooms, "no DM was opened past the quota"
