"""What the bridge keeps in memory per ghost and per room stays under a cap, and an entry that
was dropped still works when it is needed again."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dmbridge.bridge import Bridge
from dmbridge.db import Stores, now_ms
from dmbridge.localhs import free_port
from dmbridge.lru import LRU
from dmbridge.matrix import MatrixHandler
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.settings import make_settings
from tests.unit.test_lifecycle_rules import SMS, USER, make_handler

# --- the LRU itself ---------------------------------------------------------------------------


def test_an_lru_keeps_the_most_recently_used_up_to_its_cap() -> None:
    lru: LRU[str, int] = LRU(2)
    lru["a"], lru["b"] = 1, 2
    assert lru["a"] == 1  # a read makes "a" the most recent ...
    lru["c"] = 3          # ... so "b" goes
    assert dict(lru) == {"a": 1, "c": 3}
    assert lru.get("a") == 1  # get counts as a read too
    lru["d"] = 4
    assert dict(lru) == {"a": 1, "d": 4}
    assert lru.get("c") is None and lru.get("c", 0) == 0 and "c" not in lru
    lru["a"] = 5  # rewriting a key keeps the size
    assert len(lru) == 2 and lru["a"] == 5


def test_an_lru_needs_room_for_one_entry() -> None:
    with pytest.raises(ValueError, match="at least one"):
        LRU(0)


# --- typing flags, per room -------------------------------------------------------------------


def _remote(n: int) -> str:
    return f"+1555000{n:04d}"


def _room(n: int) -> str:
    return f"!typing{n}:example.org"


async def _open(stores: Stores, n: int) -> None:
    ghost = SMS.ghost_user_id(_remote(n))
    claim = f"claim-typing-{n}"
    assert await stores.dms.claim(ghost, USER, "sms", _remote(n), claim, "test", now_ms())
    assert await stores.dms.activate(ghost, USER, claim, _room(n), now_ms())


async def _typing(handler: MatrixHandler, n: int, typing: bool) -> None:
    edu = {"type": "m.typing", "room_id": _room(n),
           "content": {"user_ids": [USER] if typing else []}}
    await handler.handle_transaction(f"txn-typing-{n}-{now_ms()}-{typing}", [], [edu])


async def _told(stores: Stores) -> list[tuple[str, bool]]:
    """The typing items queued for the platform, in order: (room, typing)."""
    rows = await stores.db.fetch("SELECT payload FROM outbox WHERE type='typing' ORDER BY id")
    return [(p["room_id"], p["typing"]) for p in (json.loads(r["payload"]) for r in rows)]


async def test_typing_flags_are_dropped_on_stop_and_capped(stores: Stores) -> None:
    handler, _ = make_handler(stores)
    handler.lifecycle._typing.maxsize = 2
    for n in range(3):
        await _open(stores, n)
        await _typing(handler, n, True)
    assert list(handler.lifecycle._typing) == [_room(1), _room(2)]  # room 0 went first

    await _typing(handler, 1, False)
    assert list(handler.lifecycle._typing) == [_room(2)]  # nothing kept once typing stops
    await _typing(handler, 1, False)  # a repeated stop is not told twice
    await _typing(handler, 2, True)   # nor a repeated start

    await _typing(handler, 0, True)   # the dropped room works as a new one
    await _typing(handler, 0, False)
    assert await _told(stores) == [
        (_room(0), True), (_room(1), True), (_room(2), True), (_room(1), False),
        (_room(0), True), (_room(0), False),
    ]
    assert list(handler.lifecycle._typing) == [_room(2)]


# --- mautrix's per-ghost clients and registrations ---------------------------------------------


@pytest.fixture
async def bridge(hs: FakeHomeserver, db_url: str, tmp_path: Path) -> AsyncIterator[Bridge]:
    settings = make_settings(tmp_path, homeserver_url=hs.url, domain="localhost",
                             port=free_port(), db_url=db_url)
    bridge = Bridge(settings)
    await bridge.start()
    yield bridge
    await bridge.stop()


def _lrus(bridge: Bridge) -> tuple[LRU[Any, Any], LRU[Any, Any]]:
    clients = bridge.appservice.intent.api.children
    registered = bridge.state_store._registered
    assert isinstance(clients, LRU) and isinstance(registered, LRU)
    return clients, registered


async def test_ghost_clients_and_registrations_are_capped_and_made_again(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    clients, registered = _lrus(bridge)
    clients.maxsize = registered.maxsize = 2
    sms = bridge.settings.networks.get("sms")
    ghosts = [sms.ghost_user_id(_remote(n)) for n in range(3)]
    for n in range(3):
        await bridge.dms.send("sms", _remote(n), alice, message_id=f"m{n}", text="hi",
                              sender_name=f"Ghost {n}")
    assert set(clients) == set(registered) == set(ghosts[1:])  # the first ghost's went

    start = len(hs.requests)
    await bridge.dms.set_profile("sms", _remote(0), name="Ghost zero")
    # Made again on demand: the database knows the ghost is registered, so no new request.
    assert hs.names(start) == ["PUT displayname"]
    assert hs.displaynames[ghosts[0]] == "Ghost zero (SMS)"
    assert ghosts[0] in clients and ghosts[0] in registered
    assert len(clients) == len(registered) == 2


async def test_ghost_clients_share_one_logger(bridge: Bridge, hs: FakeHomeserver) -> None:
    alice = hs.add_human("alice")
    await bridge.dms.send("sms", _remote(7), alice, message_id="m", text="hi")
    ghost = bridge.settings.networks.get("sms").ghost_user_id(_remote(7))
    named = [name for name in logging.Logger.manager.loggerDict if ghost in name]
    assert named == []  # logging keeps every logger it made: none may be made per ghost
    assert bridge.appservice.intent.api.children[ghost].log.name == (
        "dmbridge.appservice.api.ghost")
