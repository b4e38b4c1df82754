"""The bridge SIGKILLed and restarted again and again while conversations go on both ways.

A platform writes to a few Matrix users (retrying each message under its own ID until it gets a
200) and pulls their replies (acknowledging them); the users, real nio clients, accept the DMs
and reply. Meanwhile the bridge is killed at seeded random moments: right after a first message
to a new pair (while its room is being created) or while replies are on their way. At the end
every message has arrived exactly once on each side and each pair has one room.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from nio import InviteMemberEvent, JoinResponse, SyncResponse

from tests.integration.conftest import DOMAIN, Homeserver, Platform
from tests.support.matrix import Human
from tests.support.process import BridgeProcess
from tests.support.settings import CHAT_TOKEN

SEED = 20261202
KILLS = 15
HUMANS = 3
CONTACTS = 3  # remote users; every one writes to every human: 9 pairs, 9 rooms
DEADLINE_S = 240  # for any one message to get through, and for the final drain
SETTINGS: dict[str, Any] = {
    # dm.creation_timeout stays at its default: a creation cut short by a kill is settled from
    # the homeserver as soon as its pair is next written to, not timed out.
    # A pulled event whose ack was lost to a kill is handed out again after this:
    "delivery.pull_ack_timeout": 2,
    "delivery.pull_max_wait": 1,
    "logging.level": "INFO",  # the log tail shown on failure should say what happened
}

Pair = tuple[int, str]  # (human index, contact's remote ID)


def ghost_of(remote_id: str) -> str:
    return f"@dm_chat_{remote_id}:{DOMAIN}"


@dataclass
class Person:
    """A human who accepts every DM invite and remembers which ghost invited them where."""

    human: Human
    invited_by: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    joined: set[str] = field(default_factory=set)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():  # bounded by the test's end, which sets ``stop``
            try:
                await self._sync_once()
            except (aiohttp.ClientError, TimeoutError):  # a client retries; so does this one
                await asyncio.sleep(0.2)

    async def _sync_once(self) -> None:
        resp = await self.human.client.sync(timeout=300)
        if not isinstance(resp, SyncResponse):
            await asyncio.sleep(0.2)
            return
        for room_id, info in resp.rooms.invite.items():
            for event in info.invite_state:
                if (isinstance(event, InviteMemberEvent) and event.membership == "invite"
                        and event.state_key == self.human.user_id):
                    self.invited_by[event.sender].add(room_id)
            if room_id not in self.joined and isinstance(
                    await self.human.client.join(room_id), JoinResponse):
                self.joined.add(room_id)


@dataclass
class Traffic:
    """Both directions, with what each side must end up with."""

    platform: Platform
    people: list[Person]
    sent: dict[Pair, list[str]] = field(default_factory=lambda: defaultdict(list))
    rooms: dict[Pair, set[str]] = field(default_factory=lambda: defaultdict(set))
    replies: dict[str, str] = field(default_factory=dict)  # event ID -> text
    received: list[dict[str, Any]] = field(default_factory=list)  # every pulled message event
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def send(self, pair: Pair) -> None:
        """Queue the pair's next message; it is retried under the same ID until it gets 200."""
        human, remote_id = pair
        n = len(self.sent[pair])
        text = f"{remote_id} to human {human}: message {n}"
        self.sent[pair].append(text)
        self.tasks.append(asyncio.create_task(self._put(pair, f"{remote_id}-{human}-{n}", text)))

    async def _put(self, pair: Pair, message_id: str, text: str) -> None:
        body = {"sender": pair[1], "recipient": self.people[pair[0]].human.user_id,
                "text": text}
        status, answer = await _until_answered(
            lambda: self.platform.send("chat", CHAT_TOKEN, message_id, **body), message_id)
        assert status == 200, (message_id, status, answer)
        self.rooms[pair].add(answer["room_id"])

    def reply(self, pair: Pair) -> bool:
        """The human answers in the pair's DM, once they have joined it; False if not yet."""
        person = self.people[pair[0]]
        joined = self.rooms[pair] & person.joined
        if not joined:
            return False
        text = f"human {pair[0]} to {pair[1]}: reply {len(self.replies)}"

        async def say() -> None:
            self.replies[await person.human.say(min(joined), text)] = text

        self.tasks.append(asyncio.create_task(say()))
        return True

    async def pull(self, stop: asyncio.Event) -> None:
        """The platform's receiving side: long polls, acknowledging what it got."""
        after = 0
        while not stop.is_set():  # bounded by the test's end
            try:
                status, body = await self.platform.call(
                    "GET", "/networks/chat/events", CHAT_TOKEN,
                    params={"after": str(after), "wait": "1"})
                if status != 200:  # 5xx while the bridge stops or starts
                    await asyncio.sleep(0.2)
                    continue
                self.received += [e for e in body["events"] if e["type"] == "message"]
                after = body["next_after"]
                if body["events"]:
                    await self.platform.call("POST", "/networks/chat/events/ack", CHAT_TOKEN,
                                             json={"ids": [e["id"] for e in body["events"]]})
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.2)  # the bridge is down: as a platform would, try again

    def replies_received(self) -> dict[str, str]:
        """The platform's view after dropping repeats by idempotency key."""
        return {e["idempotency_key"]: e["message"]["text"] for e in self.received}


async def _until_answered(call: Callable[[], Awaitable[tuple[int, Any]]], what: str
                          ) -> tuple[int, Any]:
    """The platform's retry: connection failures and 5xx again, until a final answer."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            status, answer = await call()
            if status < 500:
                return status, answer
        except (aiohttp.ClientError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: no answer within {DEADLINE_S} s")
        await asyncio.sleep(0.2)


async def test_bridge_killed_again_and_again_loses_and_duplicates_nothing(
    homeserver: Homeserver, db_url: str, tmp_path: Path, new_human: Callable[[], Awaitable[Human]],
) -> None:
    rng = random.Random(SEED)
    folder = tmp_path / "bridge"
    homeserver.settings(db_url, folder, **SETTINGS)
    people = [Person(await new_human()) for _ in range(HUMANS)]
    contacts = [f"crash{j}" for j in range(CONTACTS)]
    fresh: list[Pair] = [(h, c) for h in range(HUMANS) for c in contacts]
    rng.shuffle(fresh)
    known: list[Pair] = []
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=30)

    async with aiohttp.ClientSession(timeout=timeout) as session, \
            BridgeProcess(folder / "config.yaml", folder / "bridge.log") as bridge:
        traffic = Traffic(Platform(session, homeserver.bridge_port), people)
        background = [asyncio.create_task(p.run(stop)) for p in people]
        background.append(asyncio.create_task(traffic.pull(stop)))
        try:
            kinds = Counter[str]()
            for cycle in range(KILLS):
                bridge.start()
                await bridge.wait_ready(homeserver.bridge_port)
                # Conversations go on for a while: both ways, on the pairs that have a room.
                for pair in rng.sample(known, min(len(known), 3)):
                    traffic.send(pair)
                    traffic.reply(pair)
                await asyncio.sleep(rng.uniform(1.5, 3.0))
                # Then the kill, soon after something that must not be lost or doubled:
                if cycle % 2 == 0 and fresh:  # a first message: the room is being created
                    known.append(pair := fresh.pop())
                    traffic.send(pair)
                    delay, kind = rng.uniform(0.0, 0.4), "room creation"
                else:  # replies on their way from the homeserver to the bridge to the platform
                    for pair in rng.sample(known, min(len(known), 3)):
                        traffic.reply(pair)
                    delay, kind = rng.uniform(0.0, 0.5), "replies"
                await asyncio.sleep(delay)
                assert await bridge.kill() == -9, bridge.log_tail()
                kinds[kind] += 1

            bridge.start()  # the last start: everything must come through now
            await bridge.wait_ready(homeserver.bridge_port)
            for pair in known + fresh:
                traffic.send(pair)
            await _settle(traffic)
            for pair in traffic.rooms:
                await _until(lambda p=pair: traffic.reply(p), f"{pair}: the human to join")
            await _settle(traffic)
            await _drain(traffic)
        finally:
            stop.set()
            for task in background + traffic.tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*background, *traffic.tasks, return_exceptions=True)
        assert bridge.starts == KILLS + 1
        assert kinds == {"room creation": 8, "replies": 7}

    problems = await _problems(traffic)
    keys = Counter(e["idempotency_key"] for e in traffic.received)
    print(f"{db_url.split(':')[0]}: {sum(map(len, traffic.sent.values()))} messages in "
          f"{len(traffic.rooms)} DMs, {len(traffic.replies)} replies, {len(traffic.received)} "
          f"pulled ({sum(n > 1 for n in keys.values())} handed out again); {kinds}")
    assert problems == [], "\n".join([*problems, "the bridge's log about it:",
                                      *_log_about(bridge, problems)])


async def _problems(traffic: Traffic) -> list[str]:
    """Everything that went wrong, so one run shows all of it."""
    problems = []
    for pair, rooms in sorted(traffic.rooms.items()):
        human, remote_id = pair
        invited = traffic.people[human].invited_by.get(ghost_of(remote_id), set())
        if len(rooms) != 1 or invited != rooms:
            problems.append(f"{pair}: one room per pair, but the platform was answered with "
                            f"{sorted(rooms)} and the human was invited to {sorted(invited)}")
    for pair, texts in sorted(traffic.sent.items()):
        human, remote_id = pair
        seen = Counter[str]()
        for room_id in traffic.people[human].invited_by.get(ghost_of(remote_id), set()):
            seen.update(e["content"]["body"]
                        for e in await traffic.people[human].human.messages(room_id)
                        if e["sender"] == ghost_of(remote_id))
        if seen != Counter(texts):
            problems.append(f"{pair}: each message once, but sent {texts} and the human sees "
                            f"{dict(seen)}")
    if (received := traffic.replies_received()) != traffic.replies:
        problems.append(f"replies: the humans wrote {sorted(traffic.replies.values())}, the "
                        f"platform got {sorted(received.values())}")
    return problems


def _log_about(bridge: BridgeProcess, problems: list[str]) -> list[str]:
    """The restarts, warnings, errors and every line naming a room of the problems."""
    rooms = set(re.findall(r"![A-Za-z0-9_-]+", " ".join(problems)))
    lines = bridge.log_path.read_text(errors="replace").splitlines()
    return [x for x in lines if "BridgeProcess start" in x or " WARNING " in x or " ERROR " in x
            or any(room in x for room in rooms)]


async def _settle(traffic: Traffic) -> None:
    """Wait for the sends and replies queued so far (each bounded by DEADLINE_S)."""
    await asyncio.gather(*traffic.tasks)


async def _drain(traffic: Traffic) -> None:
    """Until the platform has pulled every reply (or DEADLINE_S has passed)."""
    def missing() -> list[str]:
        return [t for k, t in traffic.replies.items() if k not in traffic.replies_received()]

    await _until(lambda: not missing(), "every reply pulled", missing)


async def _until(done: Callable[[], bool], what: str,
                 details: Callable[[], object] = lambda: "") -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {DEADLINE_S} s {details()}")
        await asyncio.sleep(0.2)
