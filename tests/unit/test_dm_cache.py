"""The send path's DM cache: after any change to a DM, by this process or another one, the next
send goes where the database says (the same room, a new one, the room the user moved to) or is
refused. The cache serves SQLite; on PostgreSQL every send reads its DM."""

from __future__ import annotations

import itertools
import logging
import sqlite3
from typing import Any

import pytest
from mautrix.types import RoomID, UserID
from mautrix.util.async_db import Scheme

from dmbridge.bridge import Bridge
from dmbridge.db import Stores, create_database, dmcache, now_ms
from dmbridge.db import dm as dm_module
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
    """Two sends: on SQLite, the second is answered from the cache."""
    first = await bridge.dms.send("sms", PHONE, alice, message_id=f"w{next(_ids)}", text="hi")
    second = await bridge.dms.send("sms", PHONE, alice, message_id=f"w{next(_ids)}", text="hi")
    assert second.room_id == first.room_id
    cache = bridge.stores.dms.cache
    assert (cache.get(UserID(GHOST), UserID(alice)) is not None) == cache.enabled
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


async def test_a_pair_forgotten_by_another_process_starts_afresh(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    """``dmbridge forget`` runs in a process of its own, with the bridge running; the bridge
    hears nothing from it (the ghost's leave is not told here), yet its next send opens a new
    room."""
    alice = hs.add_human("alice")
    room = await warm(bridge, alice)
    subject = Subject.remote_user(bridge.settings.networks.get("sms"), PHONE)
    other = create_database(bridge.settings.database_url, db_args={},
                            log=logging.getLogger("dmbridge.db"))
    await other.start()
    try:
        async def leave(ghost_id: UserID, room_id: RoomID) -> None:
            return None

        async def reset(ghost_id: UserID, name: str) -> None:
            return None

        await forget(Stores.over(other), subject, leave, reset=reset)
    finally:
        await other.stop()
    after = await bridge.dms.send("sms", PHONE, alice, message_id="after", text="hello")
    assert after.room_created and after.room_id != room
    assert bodies(hs, after.room_id) == ["hello"]
    assert "hello" not in bodies(hs, room)


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
    if not cache.enabled:
        pytest.skip("the cache serves SQLite only")
    read_at = cache.version
    async with cache.writing(stores.db) as conn:
        cache.changed(dmcache.room("!r"))
        await conn.execute("SELECT 1")
    cache.fill(record("@g:x", "@u:x", "!r"), read_at)
    assert cache.get(UserID("@g:x"), UserID("@u:x")) is None


async def test_a_change_holds_its_entries_until_its_transaction_ends(stores: Stores) -> None:
    cache = stores.dms.cache
    if not cache.enabled:
        pytest.skip("the cache serves SQLite only")
    async with stores.transaction() as conn:
        cache.changed(dmcache.pair("@g:x", "@u:x"))
        cache.fill(record("@g:x", "@u:x", "!r"), cache.version)  # read inside: not kept
        assert cache.get(UserID("@g:x"), UserID("@u:x")) is None
        await conn.execute("SELECT 1")
    cache.fill(record("@g:x", "@u:x", "!r"), cache.version)
    assert cache.get(UserID("@g:x"), UserID("@u:x")) is not None


async def test_a_dm_ended_by_another_connection_is_not_sent_to(stores: Stores) -> None:
    """Another worker (PostgreSQL) or process (SQLite) ends the DM between two sends: the
    second finds no DM, on both databases."""
    ghost, user = UserID("@g:x"), UserID("@u:x")
    assert await stores.dms.claim(ghost, user, "sms", "1", "c1", "test", now_ms())
    assert await stores.dms.activate(ghost, user, "c1", RoomID("!one"), now_ms())
    got, _ = await stores.dms.get_for_send(ghost, user, "sms", "1", "m1")
    assert got is not None and got.room_id == "!one"
    got, _ = await stores.dms.get_for_send(ghost, user, "sms", "1", "m2")
    assert got is not None and got.room_id == "!one"
    assert (stores.dms.cache.get(ghost, user) is not None) == (
        stores.db.scheme == Scheme.SQLITE)
    url = stores.db.url
    other = create_database(str(url), db_args={}, log=logging.getLogger("dmbridge.db"))
    await other.start()
    try:
        await other.execute("UPDATE dm SET state='ended' WHERE room_id=$1", "!one")
    finally:
        await other.stop()
    got, _ = await stores.dms.get_for_send(ghost, user, "sms", "1", "m3")
    assert got is None


def test_the_cache_keeps_at_most_its_size() -> None:
    cache = DMCache(enabled=True, maxsize=2)
    for n in range(5):
        cache.fill(record(f"@g{n}:x", "@u:x", f"!r{n}"), cache.version)
        assert len(cache) == min(n + 1, 2)
    assert cache.get(UserID("@g4:x"), UserID("@u:x")) is not None
    assert cache.get(UserID("@g3:x"), UserID("@u:x")) is not None
    for n in range(3):
        assert cache.get(UserID(f"@g{n}:x"), UserID("@u:x")) is None
    # The indexes hold only what is kept: an evicted room's change forgets nothing kept, a
    # kept one's forgets its entry.
    cache.changed(dmcache.room("!r0"), dmcache.ghost("@g1:x"))
    assert len(cache) == 2
    cache.get(UserID("@g3:x"), UserID("@u:x"))  # used most recently: @g4 goes next
    cache.fill(record("@g5:x", "@u:x", "!r5"), cache.version)
    assert cache.get(UserID("@g4:x"), UserID("@u:x")) is None
    assert cache.get(UserID("@g3:x"), UserID("@u:x")) is not None
    cache.changed(dmcache.room("!r5"))
    assert len(cache) == 1
    assert cache._by_room == {"!r3": (UserID("@g3:x"), UserID("@u:x"))}


def test_a_moved_data_version_forgets_everything() -> None:
    cache = DMCache(enabled=True)
    cache.fill(record("@g:x", "@u:x", "!r"), cache.version)
    cache.saw_data_version(1)  # not known before: forgotten
    assert len(cache) == 0
    cache.fill(record("@g:x", "@u:x", "!r"), cache.version)
    cache.saw_data_version(1)  # nobody else committed
    assert cache.get(UserID("@g:x"), UserID("@u:x")) is not None
    read_at = cache.version
    cache.saw_data_version(2)  # another process committed
    assert cache.get(UserID("@g:x"), UserID("@u:x")) is None
    cache.fill(record("@g:x", "@u:x", "!r"), read_at)  # read before: not kept
    assert len(cache) == 0


def test_a_disabled_cache_keeps_nothing() -> None:
    cache = DMCache(enabled=False)
    cache.fill(record("@g:x", "@u:x", "!r"), cache.version)
    assert len(cache) == 0 and cache.get(UserID("@g:x"), UserID("@u:x")) is None


async def test_an_activated_dm_is_sent_to_once_cached(stores: Stores) -> None:
    """A DM opened after its pair's record was cached replaces it."""
    cache = stores.dms.cache
    if not cache.enabled:
        pytest.skip("the cache serves SQLite only")
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


async def test_a_commit_by_another_process_during_a_read_is_seen_by_the_next_send(
        stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process ends the DM right after a send read it (before the record is kept):
    the next send finds no DM."""
    if not stores.dms.cache.enabled:
        pytest.skip("the cache serves SQLite only")
    ghost, user = UserID("@g:x"), UserID("@u:x")
    assert await stores.dms.claim(ghost, user, "sms", "1", "c1", "test", now_ms())
    assert await stores.dms.activate(ghost, user, "c1", RoomID("!one"), now_ms())
    path = str(stores.db.url).removeprefix("sqlite:///")
    read = dm_module.hot.fetchrow

    async def read_then_another_commits(db: Any, query: str, *args: Any) -> Any:
        row = await read(db, query, *args)
        if "sent_room_id" in query and "LEFT JOIN dm" in query:
            other = sqlite3.connect(path)
            try:
                other.execute("UPDATE dm SET state='ended' WHERE room_id='!one'")
                other.commit()
            finally:
                other.close()
            monkeypatch.setattr(dm_module.hot, "fetchrow", read)
        return row

    monkeypatch.setattr(dm_module.hot, "fetchrow", read_then_another_commits)
    got, _ = await stores.dms.get_for_send(ghost, user, "sms", "1", "m1")
    assert got is not None and got.room_id == "!one"  # read before the other's commit
    got, _ = await stores.dms.get_for_send(ghost, user, "sms", "1", "m2")
    assert got is None
