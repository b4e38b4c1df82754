"""Open-or-reuse against a fake homeserver that records every request the bridge makes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from mautrix.types import RoomID

from dmbridge.bridge import Bridge
from dmbridge.db import now_ms
from dmbridge.dms import SendResult
from dmbridge.errors import (
    Busy,
    Declined,
    HomeserverError,
    InvalidParam,
    QuotaExceeded,
    RecipientUnreachable,
    UnknownRecipient,
)
from dmbridge.localhs import free_port
from dmbridge.marker import Marker
from dmbridge.opening import OpenedDM
from tests.support.fake_homeserver import FakeHomeserver, Room
from tests.support.settings import make_settings

PHONE = "+15551234567"
GHOST = "@dm_sms_=2b15551234567:localhost"
MakeBridge = Callable[..., Awaitable[Bridge]]



@pytest.fixture
async def make_bridge(hs: FakeHomeserver, db_url: str, tmp_path: Path
                      ) -> AsyncIterator[MakeBridge]:
    bridges: list[Bridge] = []

    async def make(**overrides: Any) -> Bridge:
        settings = make_settings(tmp_path / f"worker{len(bridges)}", homeserver_url=hs.url,
                                 domain="localhost", port=free_port(), db_url=db_url,
                                 **overrides)
        bridge = Bridge(settings)
        # Several workers share the database only on PostgreSQL; on SQLite the earlier bridges
        # stand for processes that are gone as far as the one-process lock goes (a restart).
        for earlier in bridges:
            earlier.sole_worker.release()
        await bridge.start()
        bridges.append(bridge)
        return bridge

    yield make
    for bridge in bridges:
        await bridge.stop()


@pytest.fixture
async def bridge(make_bridge: MakeBridge) -> Bridge:
    return await make_bridge()


async def test_cold_path_requests_then_one_request_when_warm(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    start = len(hs.requests)
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi",
                                  sender_name="Bob")
    assert hs.names(start) == [
        "GET profile",            # does the recipient exist?
        "POST register",          # the ghost, once
        "PUT displayname",        # its name, once
        "GET capabilities",       # the default room version, once per process
        "POST createRoom",
        "GET account_data",       # m.direct: read ...
        "PUT account_data",       # ... merge, write
        "PUT send",
    ]
    assert first.room_created
    start = len(hs.requests)
    second = await bridge.dms.send("sms", PHONE, alice, message_id="2", text="again",
                                   sender_name="Bob")
    assert hs.names(start) == ["PUT send"]
    assert second.room_id == first.room_id and not second.room_created
    assert bridge.requests.by_endpoint["PUT /_matrix/client/v3/rooms/{id}/send/{type}/{txn}"] == 2


async def test_room_is_created_as_a_direct_two_person_room(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    result = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    room = hs.rooms[result.room_id]
    assert room.creator == GHOST
    assert room.create["is_direct"] is True
    assert room.create["preset"] == "private_chat"
    assert room.create["invite"] == [alice]
    # Room version 12: the creator has power implicitly and must not be listed.
    assert room.create["power_level_content_override"] == {"users": {alice: 100}}
    kinds = {e["type"]: e for e in room.create["initial_state"]}
    assert set(kinds) == {"m.bridge", "uk.half-shot.bridge", "net.dmbridge.dm"}
    marker = kinds["net.dmbridge.dm"]
    assert marker["state_key"] == ""
    assert {k: v for k, v in marker["content"].items() if k != "claim"} == {
        "ghost_id": GHOST, "user_id": alice, "network": "sms", "remote_id": PHONE}
    assert kinds["m.bridge"]["content"]["protocol"]["id"] == "sms"
    assert kinds["m.bridge"]["content"]["channel"]["id"] == PHONE
    assert hs.displaynames[GHOST] == f"{PHONE} (SMS)"


async def test_older_room_versions_list_the_ghost_in_power_levels(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    hs.room_version = "10"
    alice = hs.add_human("alice")
    result = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    override = hs.rooms[result.room_id].create["power_level_content_override"]
    assert override == {"users": {alice: 100, GHOST: 100}}


async def test_concurrent_first_messages_create_one_room(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    hs.delay["POST createRoom"] = 0.2
    results = await asyncio.gather(*(
        bridge.dms.send("sms", PHONE, alice, message_id=str(i), text=f"m{i}") for i in range(20)
    ))
    assert len({r.room_id for r in results}) == 1
    assert hs.names().count("POST createRoom") == 1
    assert len(hs.rooms[results[0].room_id].events) == 20


async def test_two_workers_on_one_database_create_one_room(
    make_bridge: MakeBridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    worker_a, worker_b = await make_bridge(), await make_bridge()
    hs.delay["POST createRoom"] = 0.3
    results = await asyncio.gather(*(
        worker.dms.send("sms", PHONE, alice, message_id=str(i), text=f"m{i}")
        for i, worker in enumerate([worker_a, worker_b] * 5)
    ))
    assert len({r.room_id for r in results}) == 1
    assert hs.names().count("POST createRoom") == 1


async def test_m_direct_is_merged_not_overwritten(bridge: Bridge, hs: FakeHomeserver) -> None:
    alice, bob = hs.add_human("alice"), hs.add_human("bob")
    hs.account_data[(GHOST, "m.direct")] = {"@elsewhere:example.org": ["!old"]}
    a = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    b = await bridge.dms.send("sms", PHONE, bob, message_id="2", text="hi")
    assert hs.account_data[(GHOST, "m.direct")] == {
        "@elsewhere:example.org": ["!old"], alice: [a.room_id], bob: [b.room_id],
    }


async def test_retried_message_makes_no_request(bridge: Bridge, hs: FakeHomeserver) -> None:
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="x", text="hi")
    start = len(hs.requests)
    again = await bridge.dms.send("sms", PHONE, alice, message_id="x", text="hi")
    assert hs.names(start) == []
    assert (again.event_id, again.duplicate) == (first.event_id, True)


async def test_unknown_recipient_leaves_nothing_behind(bridge: Bridge, hs: FakeHomeserver
                                                       ) -> None:
    with pytest.raises(UnknownRecipient, match="does not exist"):
        await bridge.dms.send("sms", PHONE, "@ghostly:localhost", message_id="1", text="hi")
    assert "POST createRoom" not in hs.names()
    assert await bridge.dms.list_dms(network_id="sms") == []


async def test_failed_room_creation_releases_the_pair(bridge: Bridge, hs: FakeHomeserver
                                                      ) -> None:
    alice = hs.add_human("alice")
    hs.fail["POST createRoom"] = (500, {"errcode": "M_UNKNOWN", "error": "boom"})
    with pytest.raises(HomeserverError, match="create the DM room"):
        await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    del hs.fail["POST createRoom"]
    result = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    assert result.room_created and len(hs.rooms) == 1


async def test_a_refused_send_opens_a_new_room(bridge: Bridge, hs: FakeHomeserver) -> None:
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    hs.fail_next("PUT send", 403, {"errcode": "M_FORBIDDEN", "error": "not in room"})
    second = await bridge.dms.send("sms", PHONE, alice, message_id="2", text="again")
    assert second.room_id != first.room_id and second.room_created
    assert [e["content"]["body"] for e in hs.rooms[second.room_id].events] == ["again"]


async def test_left_user_is_reinvited_with_is_direct(bridge: Bridge, hs: FakeHomeserver) -> None:
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    await bridge.db.execute("UPDATE room_member SET membership='leave' WHERE user_id=$1", alice)
    start = len(hs.requests)
    second = await bridge.dms.send("sms", PHONE, alice, message_id="2", text="back?")
    assert hs.names(start) == ["PUT member_state", "PUT send"]
    assert second.room_id == first.room_id
    [(room_id, user_id, content)] = hs.invites
    assert (room_id, user_id) == (first.room_id, alice)
    assert content["membership"] == "invite" and content["is_direct"] is True
    assert await bridge.stores.members.get(first.room_id, alice) == "invite"


async def test_display_name_changes_only_when_the_platform_says_so(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi", sender_name="Bob")
    start = len(hs.requests)
    await bridge.dms.send("sms", PHONE, alice, message_id="2", text="hi")
    await bridge.dms.send("sms", PHONE, alice, message_id="3", text="hi", sender_name="Bob")
    assert hs.names(start) == ["PUT send", "PUT send"]
    await bridge.dms.send("sms", PHONE, alice, message_id="4", text="hi", sender_name="Robert")
    assert hs.names(start)[2:] == ["PUT displayname", "PUT send"]
    assert hs.displaynames[GHOST] == "Robert (SMS)"


# --- crash-safe creation ------------------------------------------------------------------------

DEAD = "0123456789abcdef"  # the instance ID of a bridge process that is gone


async def _unfinished(bridge: Bridge, hs: FakeHomeserver, user_id: str, claim: str,
                      *, room_made: bool) -> str | None:
    """A claim left by a process that died, and (if ``room_made``) the room it had made."""
    assert await bridge.stores.dms.claim(GHOST, user_id, "sms", PHONE, claim, DEAD,
                                         now_ms())
    if not room_made:
        return None
    hs.users.add(GHOST)
    room_id = f"!orphan{claim}"
    marker = Marker(GHOST, user_id, "sms", PHONE, claim).state_event()
    hs.rooms[room_id] = Room(room_id, GHOST, {"invite": [user_id], "initial_state": [marker]},
                             members={GHOST: "join", user_id: "invite"})
    return room_id


async def test_a_room_made_by_a_dead_process_is_adopted_not_made_again(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    orphan = await _unfinished(bridge, hs, alice, "c1", room_made=True)
    start = len(hs.requests)
    result = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    assert result.room_id == orphan and not result.room_created
    assert "POST createRoom" not in hs.names(start)
    assert [e["content"]["body"] for e in hs.rooms[orphan].events] == ["hi"]
    [dm] = await bridge.dms.list_dms(network_id="sms")
    assert (dm.room_id, dm.user_membership) == (orphan, "invite")
    assert hs.account_data[(GHOST, "m.direct")] == {alice: [orphan]}


async def test_a_creation_that_never_reached_the_homeserver_frees_the_pair_at_once(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    """No wait for creation_timeout (the settings' 30 s would fail the unit test's pace)."""
    alice = hs.add_human("alice")
    await _unfinished(bridge, hs, alice, "c1", room_made=False)
    result = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    assert result.room_created and list(hs.rooms) == [result.room_id]


async def test_start_up_adopts_the_rooms_of_unfinished_creations(
    make_bridge: MakeBridge, hs: FakeHomeserver
) -> None:
    first = await make_bridge()
    alice, bob = hs.add_human("alice"), hs.add_human("bob")
    orphan = await _unfinished(first, hs, alice, "c1", room_made=True)
    await _unfinished(first, hs, bob, "c2", room_made=False)
    second = await make_bridge()

    async def settled() -> bool:
        return await second.stores.dms.unfinished() == []

    for _ in range(100):
        if await settled():
            break
        await asyncio.sleep(0.05)
    [dm] = await second.dms.list_dms(network_id="sms")
    assert dm.room_id == orphan and dm.user_id == alice
    assert await second.stores.dms.get_current(GHOST, bob) is None  # bob's pair is free


async def test_the_homeserver_transaction_records_a_room_whose_creator_died(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    await _unfinished(bridge, hs, alice, "c1", room_made=False)
    marker = Marker(GHOST, alice, "sms", PHONE, "c1").state_event()
    await bridge.matrix.handle_transaction("1", [
        {**marker, "event_id": "$m", "room_id": "!made", "sender": GHOST},
        {"type": "m.room.member", "state_key": alice, "event_id": "$i", "room_id": "!made",
         "sender": GHOST, "content": {"membership": "invite", "is_direct": True}},
    ])
    [dm] = await bridge.dms.list_dms(network_id="sms")
    assert (dm.room_id, dm.user_membership) == ("!made", "invite")


async def test_a_marker_not_set_by_the_ghost_is_ignored(bridge: Bridge, hs: FakeHomeserver
                                                        ) -> None:
    alice = hs.add_human("alice")
    await _unfinished(bridge, hs, alice, "c1", room_made=False)
    marker = Marker(GHOST, alice, "sms", PHONE, "c1").state_event()
    await bridge.matrix.handle_transaction("1", [
        {**marker, "event_id": "$m", "room_id": "!forged", "sender": alice},
    ])
    assert await bridge.stores.dms.get_by_room(RoomID("!forged")) is None


async def test_a_room_made_before_create_room_failed_is_removed(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    hs.fail["POST createRoom:after"] = (500, {"errcode": "M_UNKNOWN", "error": "lost answer"})
    with pytest.raises(HomeserverError, match="create the DM room"):
        await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    [made] = hs.rooms.values()
    assert made.members == {GHOST: "leave", alice: "leave"}  # invite withdrawn, ghost gone
    assert GHOST in made.forgotten_by
    assert hs.joined_rooms(GHOST) == []
    result = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    assert result.room_created and hs.joined_rooms(GHOST) == [result.room_id]


async def test_a_recipient_on_a_server_not_federated_with_gets_no_room(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    denied = {"errcode": "M_FORBIDDEN", "error": "Federation denied with example.invalid."}
    hs.fail_next("GET profile", 403, denied)
    with pytest.raises(RecipientUnreachable, match="does not federate"):
        await bridge.dms.send("sms", PHONE, "@someone:example.invalid", message_id="1",
                              text="hi")
    assert "POST createRoom" not in hs.names() and hs.rooms == {}
    assert await bridge.stores.dms.get_current(GHOST, "@someone:example.invalid") is None


async def test_a_remote_server_that_hides_profiles_still_gets_the_invite(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    hs.fail_next("GET profile", 403, {"errcode": "M_FORBIDDEN", "error": "private"})
    result = await bridge.dms.send("sms", PHONE, "@someone:elsewhere.example",
                                   message_id="1", text="hi")
    assert result.room_created


async def _slow_stale_creation(make_bridge: MakeBridge, hs: FakeHomeserver, user_id: str
                               ) -> tuple[Bridge, asyncio.Task[SendResult]]:
    """Worker A's first message to ``user_id`` is still in createRoom, its claim already older
    than creation_timeout; worker B (returned with A's request) shares A's database."""
    worker_a, worker_b = await make_bridge(), await make_bridge()
    hs.delay["POST createRoom"] = 0.5
    slow = asyncio.create_task(worker_a.dms.send("sms", PHONE, user_id, message_id="1",
                                                 text="a"))
    for _ in range(100):  # until A holds the claim
        if await worker_a.db.fetchval("SELECT COUNT(*) FROM dm"):
            break
        await asyncio.sleep(0.01)
    await worker_a.db.execute("UPDATE dm SET updated_at=0 WHERE state='creating'")
    return worker_b, slow


async def test_a_room_made_after_a_stale_claim_was_settled_is_removed(
    make_bridge: MakeBridge, hs: FakeHomeserver
) -> None:
    """Worker A is so slow that B settles its claim (older than creation_timeout) and makes
    the room; A's room, arriving late, is removed and A's request is told to retry."""
    alice = hs.add_human("alice")
    worker_b, slow = await _slow_stale_creation(make_bridge, hs, alice)
    done = await worker_b.dms.send("sms", PHONE, alice, message_id="2", text="b")
    with pytest.raises(Busy, match="created twice"):
        await slow
    assert done.room_created and hs.joined_rooms(GHOST) == [done.room_id]
    [late] = [room for room in hs.rooms.values() if room.room_id != done.room_id]
    assert late.members == {GHOST: "leave", alice: "leave"} and GHOST in late.forgotten_by


async def test_a_late_room_its_transaction_kept_as_ended_is_not_taken_as_created(
    make_bridge: MakeBridge, hs: FakeHomeserver
) -> None:
    """As above, but the homeserver's transaction for A's late room arrives before A's answer
    and records it as an ended DM: A must still remove it, not post into it."""
    alice = hs.add_human("alice")
    worker_b, slow = await _slow_stale_creation(make_bridge, hs, alice)
    made: list[str] = []

    async def transaction_first(room: Room) -> None:
        made.append(room.room_id)
        if len(made) > 1:
            return  # only A's room (the first made: both waited as long) arrives early
        marker = next(e for e in room.create["initial_state"] if e["type"] == "net.dmbridge.dm")
        await worker_b.matrix.handle_transaction("late", [
            {**marker, "event_id": "$late-marker", "room_id": room.room_id, "sender": GHOST},
            {"type": "m.room.member", "state_key": alice, "event_id": "$late-invite",
             "room_id": room.room_id, "sender": GHOST,
             "content": {"membership": "invite", "is_direct": True}},
        ])

    hs.on_room_created = transaction_first
    done = await worker_b.dms.send("sms", PHONE, alice, message_id="2", text="b")
    with pytest.raises(Busy, match="created twice"):
        await slow
    assert made[1] == done.room_id
    late = hs.rooms[made[0]]
    assert late.events == []  # A's message was not posted into the superseded room
    assert late.members == {GHOST: "leave", alice: "leave"} and GHOST in late.forgotten_by
    assert hs.joined_rooms(GHOST) == [done.room_id]
    [dm] = await worker_b.dms.list_dms(network_id="sms")
    assert dm.room_id == done.room_id


async def test_a_display_name_too_long_for_the_homeserver_is_shortened(
    make_bridge: MakeBridge, hs: FakeHomeserver
) -> None:
    """Made from the remote ID alone (the API refuses a sender_name that does this), a display
    name over the homeserver's 256 characters is cut, not refused after the room is open."""
    bridge = await make_bridge(networks={"sms": {"displayname": "{name} " + "x" * 300}})
    alice = hs.add_human("alice")
    await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    name = hs.displaynames[GHOST]
    assert len(name) == 256 and name.startswith(PHONE + " xxx") and name.endswith("…")


async def test_a_first_contact_past_the_new_dm_quota_asks_nothing_of_the_homeserver(
    make_bridge: MakeBridge, hs: FakeHomeserver
) -> None:
    bridge = await make_bridge(networks={"sms": {"quotas": {"new_dms_per_hour": 1}}})
    alice, bob = hs.add_human("alice"), hs.add_human("bob")
    await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    start = len(hs.requests)
    with pytest.raises(QuotaExceeded, match="new_dms_per_hour"):
        await bridge.dms.send("sms", "+15550001111", bob, message_id="2", text="hi")
    assert hs.names(start) == ["GET profile"]  # the recipient check only: no ghost, no room
    assert len(await bridge.stores.dms.find(network="sms")) == 1
    assert await bridge.db.fetchval("SELECT COUNT(*) FROM dm WHERE state='creating'") == 0


async def test_a_room_kept_as_ended_never_ends_the_dm_a_recovery_made_of_it(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    """The homeserver's transaction may bring a room's marker just after a recovery made the
    room the pair's DM (the claim is gone by then): the DM stays active."""
    alice = hs.add_human("alice")
    sent = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    async with bridge.db.acquire() as conn:
        assert not await bridge.stores.dms.keep_ended(conn, GHOST, alice, "sms", PHONE,
                                                      sent.room_id, "superseded", now_ms())
        assert await bridge.stores.dms.keep_ended(conn, GHOST, alice, "sms", PHONE,
                                                  "!older", "superseded", now_ms())
    [dm] = await bridge.dms.list_dms(network_id="sms")
    assert (dm.room_id, dm.state) == (sent.room_id, "active")
    older = await bridge.stores.dms.get_by_room(RoomID("!older"))
    assert older is not None and (older.state, older.reason) == ("ended", "superseded")


async def _outbox_notices(bridge: Bridge) -> list[tuple[str, str]]:
    rows = await bridge.db.fetch("SELECT type, payload FROM outbox ORDER BY id")
    return [(r["type"], json.loads(r["payload"])["dm"]["reason"]) for r in rows]


async def test_a_fresh_dm_withdraws_the_invite_leaves_and_opens_a_new_room(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    start = len(hs.requests)
    opened = await bridge.dms.open_dm("sms", PHONE, alice, new=True)
    # A new room first; then, the user being only invited, the invite is withdrawn and the
    # ghost leaves.
    names = hs.names(start)
    assert names[:2] == ["GET profile", "POST createRoom"]
    assert names[-3:] == ["GET get_state", "POST kick", "POST leave"]
    assert (opened.created, opened.replaced) == (True, first.room_id)
    assert opened.dm.room_id != first.room_id
    old = hs.rooms[first.room_id]
    assert (old.members[alice], old.members[GHOST]) == ("leave", "leave")
    assert await _outbox_notices(bridge) == [("dm.ended", "replaced_by_platform")]
    later = await bridge.dms.send("sms", PHONE, alice, message_id="2", text="again")
    assert (later.room_id, later.room_created) == (opened.dm.room_id, False)


async def test_a_fresh_dm_with_replaces_replaces_that_room_once(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    opened = await bridge.dms.open_dm("sms", PHONE, alice, new=True, replaces=first.room_id)
    start = len(hs.requests)
    again = await bridge.dms.open_dm("sms", PHONE, alice, new=True, replaces=first.room_id)
    assert hs.names(start) == []  # a retry: the room it made is answered as it is
    assert (again.dm.room_id, again.created, again.replaced) == (opened.dm.room_id, False, None)


async def _outbox_types(bridge: Bridge) -> list[str]:
    return [r["type"] for r in await bridge.db.fetch("SELECT type FROM outbox ORDER BY id")]


async def _user_writes(bridge: Bridge, room_id: str, user_id: str, event_id: str) -> None:
    await bridge.matrix.handle_transaction(event_id, [
        {"type": "m.room.message", "room_id": room_id, "sender": user_id,
         "event_id": event_id, "content": {"msgtype": "m.text", "body": "still there?"}}])


async def test_a_fresh_dm_past_the_quota_leaves_the_current_dm_as_it_was(
    make_bridge: MakeBridge, hs: FakeHomeserver
) -> None:
    bridge = await make_bridge(networks={"sms": {"quotas": {"new_dms_per_hour": 1}}})
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    start = len(hs.requests)
    with pytest.raises(QuotaExceeded, match="new_dms_per_hour"):
        await bridge.dms.open_dm("sms", PHONE, alice, new=True)
    assert hs.names(start) == ["GET profile"]  # no kick, no leave, no room
    assert hs.rooms[first.room_id].members == {GHOST: "join", alice: "invite"}
    dm = await bridge.stores.dms.get_current(GHOST, alice)
    assert dm is not None and (dm.room_id, dm.state) == (first.room_id, "active")
    assert await _outbox_types(bridge) == []
    later = await bridge.dms.send("sms", PHONE, alice, message_id="2", text="again")
    assert (later.room_id, later.room_created) == (first.room_id, False)


async def test_a_fresh_dm_the_homeserver_refuses_leaves_the_current_dm_as_it_was(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    hs.fail_next("POST createRoom", 500, {"errcode": "M_UNKNOWN", "error": "down"})
    start = len(hs.requests)
    with pytest.raises(HomeserverError, match="create the DM room"):
        await bridge.dms.open_dm("sms", PHONE, alice, new=True)
    assert not {"POST kick", "POST leave"} & set(hs.names(start))
    assert hs.rooms[first.room_id].members == {GHOST: "join", alice: "invite"}
    dm = await bridge.stores.dms.get_current(GHOST, alice)
    assert dm is not None and (dm.room_id, dm.state) == (first.room_id, "active")
    assert await _outbox_types(bridge) == []
    # The same request again succeeds, replacing that room.
    opened = await bridge.dms.open_dm("sms", PHONE, alice, new=True, replaces=first.room_id)
    assert opened.replaced == first.room_id and opened.created


async def test_a_decline_while_a_fresh_dm_is_asked_for_stays_a_decline(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")

    async def rejects() -> None:  # the user rejects the invite as the request runs
        await bridge.matrix.handle_transaction("r", [
            {"type": "m.room.member", "state_key": alice, "room_id": first.room_id,
             "sender": alice, "event_id": "$rejected", "content": {"membership": "leave"}}])

    hs.before["GET profile"] = rejects
    start = len(hs.requests)
    with pytest.raises(Declined, match="rejected the invite"):
        await bridge.dms.open_dm("sms", PHONE, alice, new=True, replaces=first.room_id)
    assert "POST createRoom" not in hs.names(start) and hs.invites == []
    dm = await bridge.stores.dms.get_by_room(first.room_id)
    assert dm is not None and (dm.state, dm.reason) == ("declined", "invite_rejected")
    assert await _outbox_types(bridge) == ["dm.declined"]


async def test_two_workers_retrying_one_fresh_dm_make_one_room_and_one_notice(
    make_bridge: MakeBridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    worker_a, worker_b = await make_bridge(), await make_bridge()
    first = await worker_a.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    by_b: list[OpenedDM] = []

    async def b_replaces_first() -> None:  # B's try runs in full while A checks the recipient
        by_b.append(await worker_b.dms.open_dm("sms", PHONE, alice, new=True,
                                               replaces=first.room_id))

    hs.before["GET profile"] = b_replaces_first
    start = len(hs.requests)
    by_a = await worker_a.dms.open_dm("sms", PHONE, alice, new=True, replaces=first.room_id)
    assert (by_b[0].created, by_b[0].replaced) == (True, first.room_id)
    assert (by_a.dm.room_id, by_a.created, by_a.replaced) == (by_b[0].dm.room_id, False, None)
    assert hs.names(start).count("POST createRoom") == 1
    rows = await worker_a.db.fetch("SELECT type, idempotency_key FROM outbox ORDER BY id")
    assert [(r["type"], r["idempotency_key"]) for r in rows] == [
        ("dm.ended", f"dm.ended:replaced:{first.room_id}")]


async def test_a_fresh_dm_leaves_an_invite_the_user_accepted_meanwhile(
    bridge: Bridge, hs: FakeHomeserver
) -> None:
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    hs.rooms[first.room_id].members[alice] = "join"  # the bridge has not heard of it yet
    start = len(hs.requests)
    await bridge.dms.open_dm("sms", PHONE, alice, new=True)
    assert "POST kick" not in hs.names(start)
    assert hs.rooms[first.room_id].members == {GHOST: "leave", alice: "join"}


@pytest.mark.parametrize("replaces", ["", "room", "@alice:localhost"])
async def test_replaces_must_be_a_room_id(bridge: Bridge, hs: FakeHomeserver, replaces: str
                                         ) -> None:
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    start = len(hs.requests)
    with pytest.raises(InvalidParam, match="'replaces' must be a room ID"):
        await bridge.dms.open_dm("sms", PHONE, alice, new=True, replaces=replaces)
    assert hs.names(start) == []
    dm = await bridge.stores.dms.get_current(GHOST, alice)
    assert dm is not None and dm.room_id == first.room_id


async def test_a_replaced_room_the_ghost_could_not_leave_never_becomes_the_dm_again(
    make_bridge: MakeBridge, hs: FakeHomeserver, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = await make_bridge()
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    await bridge.matrix.handle_transaction("j", [
        {"type": "m.room.member", "state_key": alice, "room_id": first.room_id,
         "sender": alice, "event_id": "$joined", "content": {"membership": "join"}}])
    hs.rooms[first.room_id].members[alice] = "join"
    hs.fail_next("POST leave", 500, {"errcode": "M_UNKNOWN", "error": "down"})
    opened = await bridge.dms.open_dm("sms", PHONE, alice, new=True)
    assert opened.created and opened.dm.room_id != first.room_id
    assert f"replacing DM room {first.room_id}: leave failed" in caplog.text
    assert hs.rooms[first.room_id].members[GHOST] == "join"
    old = await bridge.stores.dms.get_by_room(first.room_id)
    assert old is not None and (old.state, old.reason) == ("ended", "replaced_by_platform")

    # What the user writes there reaches nobody and leaves the new room the DM.
    await _user_writes(bridge, first.room_id, alice, "$late")
    assert await _outbox_types(bridge) == ["dm.ended"]
    dm = await bridge.stores.dms.get_current(GHOST, alice)
    assert dm is not None and dm.room_id == opened.dm.room_id
    old = await bridge.stores.dms.get_by_room(first.room_id)
    assert old is not None and (old.state, old.reason) == ("ended", "replaced_by_platform")

    # At the next start, the ghost leaves it.
    await make_bridge()
    for _ in range(100):
        if hs.rooms[first.room_id].members[GHOST] == "leave":
            break
        await asyncio.sleep(0.05)
    assert hs.rooms[first.room_id].members[GHOST] == "leave"


async def _crash_mid_replacement(bridge: Bridge, room_id: RoomID, made: RoomID | None) -> None:
    """What a process that stopped while replacing ``room_id`` leaves: the DM ended for a
    new room and the pair claimed; with ``made``, that room recorded as the DM."""
    conn: Any
    async with bridge.db.acquire() as conn, conn.transaction():
        assert await bridge.stores.dms.replace_with_claim(conn, room_id, "being_replaced",
                                                          "c1", "", now_ms())
        if made is not None:
            assert await bridge.stores.dms.activate_in(conn, GHOST, "@alice:localhost", "c1",
                                                       made, now_ms())


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(100):
        if await check():
            return
        await asyncio.sleep(0.05)


async def test_a_replacement_that_stopped_before_its_room_leaves_the_dm_as_it_was(
    make_bridge: MakeBridge, hs: FakeHomeserver
) -> None:
    bridge = await make_bridge()
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    await _crash_mid_replacement(bridge, first.room_id, None)
    restarted = await make_bridge()

    async def restored() -> bool:
        dm = await restarted.stores.dms.get_current(GHOST, alice)
        return dm is not None and dm.state == "active"

    await _until(restored)
    dm = await restarted.stores.dms.get_current(GHOST, alice)
    assert dm is not None and (dm.room_id, dm.state) == (first.room_id, "active")
    assert hs.rooms[first.room_id].members[GHOST] == "join"
    assert await _outbox_types(restarted) == []
    later = await restarted.dms.send("sms", PHONE, alice, message_id="2", text="again")
    assert (later.room_id, later.room_created) == (first.room_id, False)


async def test_a_replacement_that_stopped_after_its_room_is_finished_at_start(
    make_bridge: MakeBridge, hs: FakeHomeserver
) -> None:
    bridge = await make_bridge()
    alice = hs.add_human("alice")
    first = await bridge.dms.send("sms", PHONE, alice, message_id="1", text="hi")
    await _crash_mid_replacement(bridge, first.room_id, RoomID("!made"))
    # Until the next start, what the user writes in the old room reaches nobody.
    await _user_writes(bridge, first.room_id, alice, "$meanwhile")
    assert await _outbox_types(bridge) == []
    restarted = await make_bridge()

    async def left() -> bool:
        return hs.rooms[first.room_id].members[GHOST] == "leave"

    await _until(left)
    assert hs.rooms[first.room_id].members == {GHOST: "leave", alice: "leave"}
    rows = await restarted.db.fetch("SELECT type, idempotency_key FROM outbox ORDER BY id")
    assert [(r["type"], r["idempotency_key"]) for r in rows] == [
        ("dm.ended", f"dm.ended:replaced:{first.room_id}")]
    old = await restarted.stores.dms.get_by_room(first.room_id)
    assert old is not None and (old.state, old.reason) == ("ended", "replaced_by_platform")
    dm = await restarted.stores.dms.get_current(GHOST, alice)
    assert dm is not None and dm.room_id == "!made"
