"""Forgetting a Matrix user or a remote user: their rows go, everyone else's stay."""

from __future__ import annotations

import json

import pytest
from mautrix.types import ContentURI, EventID, RoomID, UserID
from mautrix.util.async_db import Connection, Scheme

from dmbridge.db import Stores
from dmbridge.db.history import Transition
from dmbridge.db.invite import GhostInvite
from dmbridge.db.media import Media
from dmbridge.db.message import MatrixMessage, SentMessage
from dmbridge.db.undelivered import DEAD_LETTER
from dmbridge.encryption import CRYPTO_UPGRADE_TABLE, ENCRYPTION_CONTENT
from dmbridge.errors import InvalidParam, InvalidRemoteID, NotFound
from dmbridge.forget import Subject, forget
from tests.unit.test_networks import SMS

ALICE, BOB = UserID("@alice:example.org"), UserID("@bob:example.org")
ANN, BEN = "+15550001", "+15550002"
MEGOLM = dict(ENCRYPTION_CONTENT)


async def converse(stores: Stores, remote_id: str, user_id: UserID, room: str,
                   state: str = "active") -> None:
    """A DM with one message each way, its history, a reply queued, and the members."""
    ghost_id = SMS.ghost_user_id(remote_id)
    room_id = RoomID(room)
    conn: Connection
    async with stores.db.acquire() as conn:
        await stores.dms.adopt(conn, ghost_id, user_id, "sms", remote_id, room_id, state, "t", 1)
        await stores.history.record(conn, Transition(ghost_id, user_id, "sms", remote_id,
                                                     room_id, state, "t", None, 1))
        await stores.matrix_messages.add(conn, MatrixMessage(
            EventID(f"$from-{room}"), room_id, "sms", remote_id, user_id, "message"), 1)
        for who in (ghost_id, user_id):
            await stores.members.record(conn, room_id, who, "join", EventID(f"$j{who}{room}"))
        await stores.invites.add(conn, GhostInvite(f"{room}-inv", ghost_id, user_id, True,
                                                   "$inv", 1))
    await stores.messages.put("sms", remote_id, f"to-{room}", SentMessage(
        room_id, EventID(f"$to-{room}")), 1)
    await stores.outbox.add_now(network="sms", remote_id=remote_id, user_id=user_id,
                                type="message", key=f"$from-{room}", payload={}, now=1)
    await stores.ghosts.mark_registered(ghost_id, "sms", remote_id)
    await stores.undelivered.add_now(f"$from-{room}", room_id, ghost_id, DEAD_LETTER, 1)


async def rows(stores: Stores, table: str, where: str, *args: object) -> int:
    return int(await stores.db.fetchval(f"SELECT COUNT(*) FROM {table} WHERE {where}", *args))


async def world(stores: Stores) -> None:
    await converse(stores, ANN, ALICE, "!ann-alice")
    await converse(stores, BEN, ALICE, "!ben-alice", state="declined")
    await converse(stores, ANN, BOB, "!ann-bob")
    await converse(stores, BEN, BOB, "!ben-bob")


async def test_forgetting_a_matrix_user_removes_their_data_and_tells_each_dm(
        stores: Stores) -> None:
    await world(stores)
    left: list[tuple[str, str]] = []

    async def leave(ghost_id: UserID, room_id: RoomID) -> None:
        left.append((ghost_id, room_id))

    alice = Subject.matrix_user(ALICE, "@bot:example.org", [SMS])
    done = await forget(stores, alice, leave, settle=0)

    assert sorted(left) == [(SMS.ghost_user_id(ANN), "!ann-alice"),
                            (SMS.ghost_user_id(BEN), "!ben-alice")]
    assert done.notices == 2 and not done.failed
    for table, column in (("dm", "user_id"), ("dm_history", "user_id"),
                          ("matrix_message", "user_id"), ("ghost_invite", "inviter")):
        assert await rows(stores, table, f"{column}=$1", ALICE) == 0, table
        assert await rows(stores, table, f"{column}=$1", BOB) == 2, table
    assert await rows(stores, "sent_message", "room_id LIKE '%alice'") == 0
    assert await rows(stores, "sent_message", "room_id LIKE '%bob'") == 2
    assert await rows(stores, "room_member", "room_id LIKE '%alice'") == 0
    assert await rows(stores, "room_member", "room_id LIKE '%bob'") == 4
    assert await rows(stores, "undelivered_notice", "room_id LIKE '%alice'") == 0
    assert await rows(stores, "undelivered_notice", "room_id LIKE '%bob'") == 2
    # Of Alice's outbox only the notices are left, one per DM, for the platform to take.
    notices = await stores.db.fetch("SELECT type, payload FROM outbox WHERE user_id=$1 ORDER BY"
                                    " remote_id", ALICE)
    assert [r["type"] for r in notices] == ["dm.forgotten", "dm.forgotten"]
    payloads = [json.loads(r["payload"]) for r in notices]
    assert [(p["remote_id"], p["room_id"], p["dm"]["reason"]) for p in payloads] == [
        (ANN, "!ann-alice", "forgotten_by_admin"), (BEN, "!ben-alice", "forgotten_by_admin")]
    assert await rows(stores, "outbox", "user_id=$1", BOB) == 2
    assert await rows(stores, "ghost", "1=1") == 2  # the contacts themselves are not forgotten
    assert done.counts["dm"] == 2 and done.counts["sent_message"] == 2


async def test_forgetting_a_remote_user_removes_their_dms_ghost_and_avatar(
        stores: Stores) -> None:
    await world(stores)
    ann = SMS.ghost_user_id(ANN)
    await stores.media.add(Media(ContentURI("mxc://x/ann"), "sms", "image/png", 1), 1)
    await stores.ghosts.set_avatar(ann, "mxc://x/ann")

    async def leave(ghost_id: UserID, room_id: RoomID) -> None:
        assert ghost_id == ann

    done = await forget(stores, Subject.remote_user(SMS, ANN), leave, settle=0)

    assert done.left == ["!ann-alice", "!ann-bob"] and done.notices == 2
    for table, column in (("dm", "ghost_id"), ("dm_history", "ghost_id"),
                          ("ghost_invite", "ghost_id"), ("ghost", "user_id")):
        assert await rows(stores, table, f"{column}=$1", ann) == 0, table
    for table in ("sent_message", "matrix_message"):
        assert await rows(stores, table, "remote_id=$1", ANN) == 0, table
        assert await rows(stores, table, "remote_id=$1", BEN) == 2, table
    assert await rows(stores, "outbox", "remote_id=$1 AND type<>'dm.forgotten'", ANN) == 0
    assert await rows(stores, "outbox", "remote_id=$1", BEN) == 2
    assert await rows(stores, "undelivered_notice", "ghost_id=$1", ann) == 0
    assert await rows(stores, "undelivered_notice", "ghost_id=$1", SMS.ghost_user_id(BEN)) == 2
    assert await stores.media.get("sms", "mxc://x/ann") is None
    assert await rows(stores, "dm", "ghost_id=$1", SMS.ghost_user_id(BEN)) == 2


async def test_a_room_the_ghost_could_not_leave_is_kept_for_another_run(stores: Stores) -> None:
    await world(stores)
    subject = Subject.matrix_user(ALICE, "@bot:example.org", [SMS])

    async def unreachable(ghost_id: UserID, room_id: RoomID) -> None:
        if room_id == "!ben-alice":
            raise ConnectionError("homeserver down")

    done = await forget(stores, subject, unreachable, settle=0)
    assert done.left == ["!ann-alice"] and list(done.failed) == ["!ben-alice"]
    [kept] = await stores.dms.of_user(ALICE)
    assert (kept.room_id, kept.state, kept.ghost_membership) == ("!ben-alice", "ended", "leave")
    assert await rows(stores, "sent_message", "room_id='!ben-alice'") == 0

    async def fine(ghost_id: UserID, room_id: RoomID) -> None:
        pass

    again = await forget(stores, subject, fine, settle=0)
    assert again.left == ["!ben-alice"] and again.notices == 0  # told once already
    assert await stores.dms.of_user(ALICE) == []
    with pytest.raises(NotFound):
        await forget(stores, subject, fine, settle=0)


def test_who_can_be_forgotten() -> None:
    with pytest.raises(InvalidParam, match="not a Matrix user ID"):
        Subject.matrix_user("alice", "@bot:example.org", [SMS])
    with pytest.raises(InvalidParam, match="a user of this bridge"):
        Subject.matrix_user(SMS.ghost_user_id(ANN), "@bot:example.org", [SMS])
    with pytest.raises(InvalidRemoteID):
        Subject.remote_user(SMS, "not a phone number")


async def test_a_ghost_whose_profile_could_not_be_reset_is_kept_for_another_run(
        stores: Stores) -> None:
    await world(stores)
    ann = SMS.ghost_user_id(ANN)
    resets: list[tuple[str, str]] = []

    async def leave(ghost_id: UserID, room_id: RoomID) -> None:
        pass

    async def down(ghost_id: UserID, displayname: str) -> None:
        raise ConnectionError("homeserver down")

    async def reset(ghost_id: UserID, displayname: str) -> None:
        resets.append((ghost_id, displayname))

    done = await forget(stores, Subject.remote_user(SMS, ANN), leave, settle=0, reset=down)
    assert done.profile_error == "homeserver down"
    assert await stores.ghosts.get(ann) is not None and await stores.dms.of_ghost(ann) == []
    again = await forget(stores, Subject.remote_user(SMS, ANN), leave, settle=0, reset=reset)
    assert again.profile_error is None and resets == [(ann, f"{ANN} (SMS)")]
    assert await stores.ghosts.get(ann) is None


async def test_forgetting_a_matrix_user_removes_the_room_keys_of_their_encrypted_dms(
        stores: Stores) -> None:
    if stores.db.scheme != Scheme.SQLITE:  # emptied, with its version, by ``stores``: anew
        for row in await stores.db.fetch("SELECT tablename FROM pg_tables WHERE"
                                         " schemaname = 'public' AND tablename LIKE 'crypto%'"):
            await stores.db.execute(f"DROP TABLE {row['tablename']} CASCADE")
    await CRYPTO_UPGRADE_TABLE.upgrade(stores.db)
    await world(stores)
    conn: Connection
    async with stores.db.acquire() as conn:
        for room, user in (("!ann-alice", ALICE), ("!ann-bob", BOB)):
            await stores.encrypted_rooms.record(conn, RoomID(room), MEGOLM, 1)
            await stores.undecrypted.add(conn, {"event_id": f"$wait-{room}", "room_id": room}, 1)
            await conn.execute(
                "INSERT INTO crypto_megolm_inbound_session (account_id, session_id, sender_key,"
                " room_id) VALUES ($1, $2, $3, $4)", SMS.ghost_user_id(ANN),
                f"session-{room}", f"key-{room}", room)
            await conn.execute("INSERT INTO crypto_tracked_user (user_id) VALUES ($1)", user)

    async def leave(ghost_id: UserID, room_id: RoomID) -> None:
        pass

    await forget(stores, Subject.matrix_user(ALICE, "@bot:example.org", [SMS]), leave, settle=0)
    for table in ("crypto_megolm_inbound_session", "encrypted_room", "undecrypted_event"):
        assert await rows(stores, table, "room_id=$1", "!ann-alice") == 0, table
        assert await rows(stores, table, "room_id=$1", "!ann-bob") == 1, table
    assert await rows(stores, "crypto_tracked_user", "user_id=$1", ALICE) == 0
    assert await rows(stores, "crypto_tracked_user", "user_id=$1", BOB) == 1
