"""The send path's DM cache inside one process: after any change to a DM, the next send goes
where the database says (the same room, a new one, the room the user moved to) or is refused."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from mautrix.types import RoomID, UserID

from dmbridge.bridge import Bridge
from dmbridge.db import Stores, dmcache, now_ms
from dmbridge.db.dm import ACTIVE, DMRecord
from dmbridge.db.dmcache import DMCache
from dmbridge.errors import Declined
from dmbridge.forget import Subject, forget
from tests.support.fake_homeserver import FakeHomeserver
from tests.unit import test_dms_fake_homeserver as with_fake_homeserver
from tests.unit.test_dms_fake_homeserver import GHOST, PHONE, MakeBridge

# The bridges on the fake homeserver, as the open-or-reuse tests make them.
make_bridge = with_fake_homeserver.make_bridge
bridge = with_fake_homeserver.bridge

_ids = itertools.count()


def member(room_id: str, state_key: str, membership: str, sender: str | None = None
           ) -> dict[str, Any]:
    return {"type": "m.room.member", "room_id": room_id, "sender": sender or state_key,
            "state_key": state_key, "event_id": f"$cache{next(_ids)}",
            "origin_server_ts": 1_700_000_000_000, "content": {"membership": membership}}


def text(room_id: str, sender: str, body: str) -> dict[str, Any]:
    return {"type": "m.room.message", "room_id": room_id, "sender": sender,
            "event_id": f"$cache{next(_ids)}", "origin_server_ts": 1_700_000_000_000,
            "content": {"msgtype": "m.text", "body": body}}


async def homeserver_says(bridge: Bridge, *events: dict[str, Any]) -> None:
    await bridge.matrix.handle_transaction(f"cache{next(_ids)}", list(events))


async def warm(bridge: Bridge, alice: str) -> RoomID:
    """Two sends: the second is answered from the cache."""
    first = await bridge.dms.send("sms", PHONE, alice, message_id=f"w{next(_ids)}", text="hi")
    second = await bridge.dms.send("sms", PHONE, alice, message_id=f"w{next(_ids)}", text="hi")
    assert second.room_id == first.room_id
    assert bridge.stores.dms.cache.get(UserID(GHOST), UserID(alice)) is not None
    return first.room_id


def bodies(hs: FakeHomeserver, room_id: str) -> list[str]:
    return [e["content"]["body"] for e in hs.rooms[room_id].events
            if e.get("type") == "m.room.message"]


async def test_a_user_who_left_gets_a_new_room(make_bridge: MakeBridge, hs: FakeHomeserver
                                               ) -> None:
    bridge = await make_bridge(**{"dm.on_leave": "new_room"})
    alice = hs.add_human("alice")
    room = await warm(bridge, alice)
    await homeserver_says(bridge, member(room, alice, "join"), member(room, alice, "leave"))
    after = await bridge.dms.send("sms", PHONE, alice, message_id="after", text="still there?")
    assert after.room_created and after.room_id != room
    assert bodies(hs, after.room_id) == ["still there?"]


async def test_a_user_who_left_is_invited_back_into_the_same_room(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    room = await warm(bridge, alice)
    await homeserver_says(bridge, member(room, alice, "join"), member(room, alice, "leave"))
    after = await bridge.dms.send("sms", PHONE, alice, message_id="after", text="back?")
    assert after.room_id == room and not after.room_created
    assert [(r, u) for r, u, _ in hs.invites] == [(room, alice)]


async def test_a_user_who_removed_the_contact_is_not_written_to_until_cleared(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    room = await warm(bridge, alice)
    await homeserver_says(bridge, member(room, alice, "join"),
                          member(room, GHOST, "leave", sender=alice))
    with pytest.raises(Declined):
        await bridge.dms.send("sms", PHONE, alice, message_id="refused", text="hello?")
    await bridge.dms.clear_declined("sms", PHONE, alice)
    after = await bridge.dms.send("sms", PHONE, alice, message_id="after", text="hello again")
    assert after.room_created and after.room_id != room
    assert "hello?" not in bodies(hs, room)


async def test_a_third_person_joining_moves_the_dm_to_a_new_room(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice, mallory = hs.add_human("alice"), hs.add_human("mallory")
    room = await warm(bridge, alice)
    await homeserver_says(bridge, member(room, alice, "join"), member(room, mallory, "join"))
    after = await bridge.dms.send("sms", PHONE, alice, message_id="after", text="private")
    assert after.room_created and after.room_id != room
    assert "private" not in bodies(hs, room)


async def test_the_user_writing_in_an_older_room_makes_it_the_dm_again(
    make_bridge: MakeBridge, hs: FakeHomeserver
) -> None:
    bridge = await make_bridge(**{"dm.on_leave": "new_room"})
    alice = hs.add_human("alice")
    old = await warm(bridge, alice)
    await homeserver_says(bridge, member(old, alice, "join"), member(old, alice, "leave"))
    new = (await bridge.dms.send("sms", PHONE, alice, message_id="n", text="new")).room_id
    await warm(bridge, alice)
    # She comes back to the old room (invited by nobody here: the homeserver says so) and
    # writes there: that room is the DM again.
    await homeserver_says(bridge, member(old, alice, "join"), text(old, alice, "over here"))
    after = await bridge.dms.send("sms", PHONE, alice, message_id="after", text="got it")
    assert after.room_id == old != new
    assert bodies(hs, old)[-1] == "got it"


async def test_a_forgotten_pair_starts_afresh(bridge: Bridge, hs: FakeHomeserver) -> None:
    alice = hs.add_human("alice")
    room = await warm(bridge, alice)
    subject = Subject.remote_user(bridge.settings.networks.get("sms"), PHONE)

    async def leave(ghost_id: UserID, room_id: RoomID) -> None:
        await homeserver_says(bridge, member(room_id, ghost_id, "leave"))

    async def reset(ghost_id: UserID, name: str) -> None:
        return None

    await forget(bridge.stores, subject, leave, reset=reset)
    after = await bridge.dms.send("sms", PHONE, alice, message_id="after", text="hello")
    assert after.room_created and after.room_id != room


async def test_a_new_sender_name_is_set_once(bridge: Bridge, hs: FakeHomeserver) -> None:
    alice = hs.add_human("alice")
    await warm(bridge, alice)
    start = len(hs.requests)
    for n in range(3):
        await bridge.dms.send("sms", PHONE, alice, message_id=f"n{n}", text="hi",
                              sender_name="Robert")
    assert hs.names(start) == ["PUT displayname", "PUT send", "PUT send", "PUT send"]


# --- the cache's own rules ----------------------------------------------------------------------


def record(ghost_id: str, user_id: str, room_id: str) -> DMRecord:
    return DMRecord(UserID(ghost_id), UserID(user_id), "sms", "1", RoomID(room_id), ACTIVE,
                    None, 0, "join", "join", 0, None, None, None)


async def test_a_record_read_before_a_change_is_not_kept(stores: Stores) -> None:
    cache = stores.dms.cache
    cache.set_trusted(True)
    read_at = cache.version
    async with cache.writing(stores.db) as conn:
        cache.changed(dmcache.room("!r"))
        await conn.execute("SELECT 1")
    cache.fill(record("@g:x", "@u:x", "!r"), read_at)
    assert cache.get(UserID("@g:x"), UserID("@u:x")) is None


async def test_a_change_holds_its_entries_until_its_transaction_ends(stores: Stores) -> None:
    cache = stores.dms.cache
    cache.set_trusted(True)
    async with stores.transaction() as conn:
        cache.changed(dmcache.pair("@g:x", "@u:x"))
        cache.fill(record("@g:x", "@u:x", "!r"), cache.version)  # read inside: not kept
        assert cache.get(UserID("@g:x"), UserID("@u:x")) is None
        await conn.execute("SELECT 1")
    cache.fill(record("@g:x", "@u:x", "!r"), cache.version)
    assert cache.get(UserID("@g:x"), UserID("@u:x")) is not None


def test_changes_heard_from_another_worker_are_forgotten() -> None:
    cache = DMCache(shared=True)
    assert cache.get(UserID("@g:x"), UserID("@u:x")) is None
    cache.fill(record("@g:x", "@u:x", "!r"), cache.version)
    assert len(cache) == 0  # not trusted: nothing is kept while other workers are not heard
    cache.set_trusted(True)
    for ghost, user, room in (("@g:x", "@u:x", "!r"), ("@g:x", "@v:x", "!s"),
                              ("@h:x", "@u:x", "!t")):
        cache.fill(record(ghost, user, room), cache.version)
    cache.heard(dmcache.encode([dmcache.room("!r")]))
    assert cache.get(UserID("@g:x"), UserID("@u:x")) is None
    cache.heard(dmcache.encode([dmcache.ghost("@g:x")]))
    assert cache.get(UserID("@g:x"), UserID("@v:x")) is None
    assert cache.get(UserID("@h:x"), UserID("@u:x")) is not None
    cache.set_trusted(False)  # the listening connection is lost
    assert cache.get(UserID("@h:x"), UserID("@u:x")) is None


def test_the_cache_keeps_at_most_its_size() -> None:
    cache = DMCache(shared=False, maxsize=2)
    for n in range(5):
        cache.fill(record(f"@g{n}:x", "@u:x", f"!r{n}"), cache.version)
    assert len(cache) == 2
    assert cache.get(UserID("@g4:x"), UserID("@u:x")) is not None
    assert cache.get(UserID("@g0:x"), UserID("@u:x")) is None
    cache.heard(dmcache.encode([dmcache.room("!r0"), dmcache.ghost("@g1:x")]))  # evicted
    assert len(cache) == 2


async def test_an_activated_dm_is_sent_to_once_cached(stores: Stores) -> None:
    """A DM opened after its pair's record was cached replaces it."""
    cache = stores.dms.cache
    cache.set_trusted(True)
    ghost, user = UserID("@g:x"), UserID("@u:x")
    assert await stores.dms.claim(ghost, user, "sms", "1", "c1", "test", now_ms())
    assert await stores.dms.activate(ghost, user, "c1", RoomID("!one"), now_ms())
    await stores.members.assume(RoomID("!one"), ghost, "join")
    got, _ = await stores.dms.get_for_send(ghost, user, "sms", "1", "m1")
    assert got is not None and got.room_id == "!one"
    assert cache.get(ghost, user) is not None
    await stores.dms.end(RoomID("!one"), now_ms())
    assert cache.get(ghost, user) is None
    assert await stores.dms.claim(ghost, user, "sms", "1", "c2", "test", now_ms())
    assert await stores.dms.activate(ghost, user, "c2", RoomID("!two"), now_ms())
    got, _ = await stores.dms.get_for_send(ghost, user, "sms", "1", "m2")
    assert got is not None and got.room_id == "!two"
