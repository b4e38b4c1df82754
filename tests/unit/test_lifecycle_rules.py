"""A DM's life from the homeserver's transactions: leaves, declines, strangers and replies.

Runs MatrixHandler.handle_transaction on a real database (both backends) with hand-made events;
no homeserver is involved.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from dmbridge.db import Stores, now_ms
from dmbridge.db.dm import ACTIVE, DECLINED, ENDED, JOINING, DMRecord
from dmbridge.db.outbox import OutboxItem
from dmbridge.errors import NotFound
from dmbridge.ghosts import Ghosts
from dmbridge.lifecycle import clear_declined
from dmbridge.matrix import MatrixHandler
from dmbridge.networks import Networks
from tests.unit.test_networks import make_network

SMS = make_network()
NETWORKS = Networks([SMS])
REMOTE = "+15551234567"
GHOST = SMS.ghost_user_id(REMOTE)
USER = "@alice:example.org"
STRANGER = "@mallory:example.org"
BOT = "@dmbridge_bot:example.org"
ROOM = "!dm:example.org"

_counter = itertools.count()


class Recorder:
    def __init__(self) -> None:
        self.queued: list[set[str]] = []
        self.invited = 0


async def _noop(event: Any) -> None:
    return None


def make_handler(stores: Stores, on_leave: str = "reinvite") -> tuple[MatrixHandler, Recorder]:
    appservice = SimpleNamespace(bot_mxid=BOT, state_store=SimpleNamespace(update_state=_noop))
    handler = MatrixHandler(stores=stores, networks=NETWORKS, appservice=cast(Any, appservice),
                            ghosts=cast(Ghosts, None), on_leave=on_leave)
    recorder = Recorder()
    handler.on_queued = lambda networks: recorder.queued.append(set(networks))

    def invited() -> None:
        recorder.invited += 1

    handler.on_invited = invited
    return handler, recorder


@pytest.fixture
def handler(stores: Stores) -> tuple[MatrixHandler, Recorder]:
    return make_handler(stores)


async def open_dm(stores: Stores, room_id: str = ROOM, *, user: str = "join",
                  ghost: str = "join", user_name: str | None = "Alice") -> None:
    """A DM the bridge opened: the pair's row, active, with the memberships it assumes."""
    claim = f"claim-{next(_counter)}"
    assert await stores.dms.claim(GHOST, USER, "sms", REMOTE, claim, "test", now_ms())
    assert await stores.dms.activate(GHOST, USER, claim, room_id, now_ms())
    await stores.members.assume(room_id, GHOST, ghost)
    await stores.members.assume(room_id, USER, user, user_name)


def new_event_id() -> str:
    return f"$event{next(_counter)}"


def member(state_key: str, membership: str, *, sender: str | None = None,
           room_id: str = ROOM, event_id: str | None = None, **content: Any) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "room_id": room_id,
        "sender": sender or state_key,
        "state_key": state_key,
        "event_id": event_id or new_event_id(),
        "origin_server_ts": 1_700_000_000_000,
        "content": {"membership": membership, **content},
    }


def message(sender: str = USER, body: str = "hello", *, room_id: str = ROOM,
            event_id: str | None = None, **content: Any) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "room_id": room_id,
        "sender": sender,
        "event_id": event_id or new_event_id(),
        "origin_server_ts": 1_700_000_000_123,
        "content": {"msgtype": "m.text", "body": body, **content},
    }


async def send(handler: MatrixHandler, *events: dict[str, Any]) -> None:
    await handler.handle_transaction(f"txn{next(_counter)}", list(events))


async def dm_of(stores: Stores, room_id: str = ROOM) -> DMRecord:
    async with stores.db.acquire() as conn:
        dm = await stores.dms.by_room(conn, room_id)
    assert dm is not None
    return dm


async def outbox(stores: Stores) -> list[dict[str, Any]]:
    """Every queued item as the platform would get it, with type and id, in order."""
    rows = await stores.db.fetch(
        "SELECT id, type, idempotency_key, network, remote_id, user_id, payload FROM outbox"
        " ORDER BY id"
    )
    items = []
    for row in rows:
        payload = json.loads(row["payload"])
        assert payload["type"] == row["type"]
        assert payload["idempotency_key"] == row["idempotency_key"]
        assert (row["network"], row["remote_id"], row["user_id"]) == ("sms", REMOTE, USER)
        items.append({"id": row["id"], **payload})
    return items


async def history(stores: Stores) -> list[tuple[str | None, str, str, str | None]]:
    return [(t.room_id, t.state, t.reason, t.event_id)
            for t in await stores.history.of_pair(GHOST, USER)]


def notice(item: dict[str, Any]) -> tuple[str, str, str, str | None]:
    return item["type"], item["dm"]["state"], item["dm"]["reason"], item["dm"]["event_id"]


# --- memberships ----------------------------------------------------------------------------


async def test_user_rejecting_the_invite_declines(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, rec = handler
    await open_dm(stores, user="invite")
    leave = member(USER, "leave")
    await send(h, leave)
    dm = await dm_of(stores)
    assert (dm.state, dm.reason) == (DECLINED, "invite_rejected")
    [item] = await outbox(stores)
    assert notice(item) == ("dm.declined", "declined", "invite_rejected", leave["event_id"])
    assert item["idempotency_key"] == f"dm.declined:{leave['event_id']}"
    assert (item["network"], item["remote_id"], item["ghost_id"], item["user_id"],
            item["room_id"]) == ("sms", REMOTE, GHOST, USER, ROOM)
    assert await history(stores) == [(ROOM, DECLINED, "invite_rejected", leave["event_id"])]
    assert rec.queued == [{"sms"}]
    # The pair's slot is held: no new DM can be claimed while declined.
    assert not await stores.dms.claim(GHOST, USER, "sms", REMOTE, "again", "test", now_ms())


async def test_rejection_known_from_prev_content_when_no_membership_was_recorded(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    claim = "claim-unsigned"
    assert await stores.dms.claim(GHOST, USER, "sms", REMOTE, claim, "test", now_ms())
    assert await stores.dms.activate(GHOST, USER, claim, ROOM, now_ms())
    leave = member(USER, "leave")
    leave["unsigned"] = {"prev_content": {"membership": "invite"}}
    await send(h, leave)
    assert ((await dm_of(stores)).state, (await dm_of(stores)).reason) == (
        DECLINED, "invite_rejected")


async def test_invite_withdrawn_by_someone_else_is_not_a_rejection(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores, user="invite")
    await send(h, member(USER, "leave", sender=GHOST))
    assert (await dm_of(stores)).state != DECLINED


async def test_user_leaving_a_joined_dm_with_reinvite(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, rec = handler
    await open_dm(stores)
    leave = member(USER, "leave")
    await send(h, leave)
    dm = await dm_of(stores)
    assert dm.state == ACTIVE
    assert dm.user_membership == "leave"
    [item] = await outbox(stores)
    assert notice(item) == ("dm.user_left", "active", "user_left", leave["event_id"])
    assert await history(stores) == [(ROOM, ACTIVE, "user_left", leave["event_id"])]
    assert rec.queued == [{"sms"}]


async def test_user_leaving_a_joined_dm_with_new_room(stores: Stores) -> None:
    h, _ = make_handler(stores, on_leave="new_room")
    await open_dm(stores)
    leave = member(USER, "leave")
    await send(h, leave)
    dm = await dm_of(stores)
    assert (dm.state, dm.reason) == (ENDED, "user_left")
    [item] = await outbox(stores)
    assert notice(item) == ("dm.user_left", "ended", "user_left", leave["event_id"])
    assert await history(stores) == [(ROOM, ENDED, "user_left", leave["event_id"])]
    # The pair is free for a new room.
    assert await stores.dms.claim(GHOST, USER, "sms", REMOTE, "next", "test", now_ms())


async def test_user_banned_ends_the_dm(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores)
    ban = member(USER, "ban", sender=STRANGER)
    await send(h, ban)
    assert ((await dm_of(stores)).state, (await dm_of(stores)).reason) == (ENDED, "user_banned")
    [item] = await outbox(stores)
    assert notice(item) == ("dm.ended", "ended", "user_banned", ban["event_id"])


@pytest.mark.parametrize(("membership", "reason"), [("leave", "ghost_kicked"),
                                                    ("ban", "ghost_banned")])
async def test_user_removing_the_ghost_declines(
    stores: Stores, handler: tuple[MatrixHandler, Recorder], membership: str, reason: str
) -> None:
    h, _ = handler
    await open_dm(stores)
    kick = member(GHOST, membership, sender=USER)
    await send(h, kick)
    dm = await dm_of(stores)
    assert (dm.state, dm.reason, dm.ghost_membership) == (DECLINED, reason, membership)
    [item] = await outbox(stores)
    assert notice(item) == ("dm.declined", "declined", reason, kick["event_id"])
    assert await history(stores) == [(ROOM, DECLINED, reason, kick["event_id"])]


async def test_ghost_kicked_by_a_third_person_ends_the_dm(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores)
    kick = member(GHOST, "leave", sender=STRANGER)
    await send(h, kick)
    dm = await dm_of(stores)
    assert (dm.state, dm.reason) == (ENDED, "ghost_removed")
    [item] = await outbox(stores)
    assert notice(item) == ("dm.ended", "ended", "ghost_removed", kick["event_id"])
    assert await history(stores) == [(ROOM, ENDED, "ghost_removed", kick["event_id"])]


async def test_ghost_leaving_by_itself_ends_an_active_dm(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores)
    leave = member(GHOST, "leave")
    await send(h, leave)
    assert ((await dm_of(stores)).state, (await dm_of(stores)).reason) == (
        ENDED, "ghost_removed")
    assert [notice(i) for i in await outbox(stores)] == [
        ("dm.ended", "ended", "ghost_removed", leave["event_id"])]


async def test_ghost_leaving_a_room_it_is_joining_is_the_bridges_own_refusal(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    async with stores.db.acquire() as conn:
        await stores.dms.adopt(conn, GHOST, USER, "sms", REMOTE, ROOM, JOINING, "user_invited",
                               now_ms())
    await send(h, member(GHOST, "leave"))
    assert (await dm_of(stores)).state == JOINING
    assert await outbox(stores) == []
    # Kicked by someone else while joining: that still ends it.
    kick = member(GHOST, "leave", sender=STRANGER)
    await send(h, kick)
    assert ((await dm_of(stores)).state, (await dm_of(stores)).reason) == (
        ENDED, "ghost_removed")


async def test_third_party_joining_ends_the_dm(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, rec = handler
    await open_dm(stores)
    await send(h, member(STRANGER, "invite", sender=USER))  # an invite alone changes nothing
    assert (await dm_of(stores)).state == ACTIVE
    assert await outbox(stores) == []
    assert rec.queued == []
    join = member(STRANGER, "join")
    await send(h, join)
    dm = await dm_of(stores)
    assert (dm.state, dm.reason, dm.others_joined) == (ENDED, "third_party_joined", 1)
    [item] = await outbox(stores)
    assert notice(item) == ("dm.ended", "ended", "third_party_joined", join["event_id"])
    assert await history(stores) == [(ROOM, ENDED, "third_party_joined", join["event_id"])]
    # Messages from that room are no longer delivered.
    await send(h, message(body="still there?"))
    assert len(await outbox(stores)) == 1


async def test_an_ended_dm_ignores_further_memberships(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores)
    await send(h, member(STRANGER, "join"))
    await send(h, member(GHOST, "leave", sender=USER), member(USER, "leave"))
    assert ((await dm_of(stores)).state, (await dm_of(stores)).reason) == (
        ENDED, "third_party_joined")
    assert len(await outbox(stores)) == 1
    assert len(await history(stores)) == 1


async def test_memberships_in_other_rooms_change_nothing(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, rec = handler
    await open_dm(stores)
    other = "!other:example.org"
    await send(h, member(USER, "leave", room_id=other), member(STRANGER, "join", room_id=other),
               message(room_id=other))
    assert (await dm_of(stores)).state == ACTIVE
    assert await outbox(stores) == []
    assert await history(stores) == []
    assert rec.queued == []


async def test_a_user_inviting_a_ghost_is_recorded_for_the_invite_handler(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, rec = handler
    room = "!new:example.org"
    invite = member(GHOST, "invite", sender=USER, room_id=room, is_direct=True)
    await send(h, invite)
    [recorded] = await stores.invites.all()
    assert (recorded.room_id, recorded.ghost_id, recorded.inviter, recorded.is_direct,
            recorded.event_id) == (room, GHOST, USER, True, invite["event_id"])
    assert rec.invited == 1
    # The bridge's own invites are not answered as if a user made them.
    await send(h, member(GHOST, "invite", sender=BOT, room_id="!mine:example.org"))
    assert len(await stores.invites.all()) == 1
    assert rec.invited == 1
    # Withdrawn before the ghost answered: forgotten.
    await send(h, member(GHOST, "leave", sender=USER, room_id=room))
    assert await stores.invites.all() == []


# --- messages -------------------------------------------------------------------------------


async def test_users_message_is_queued_with_its_payload(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, rec = handler
    await open_dm(stores)
    before = now_ms()
    msg = message(body="hi *there*", format="org.matrix.custom.html",
                  formatted_body="hi <em>there</em>")
    await send(h, msg)
    [item] = await outbox(stores)
    assert before <= item["queued_at"] <= now_ms()
    assert item == {
        "id": item["id"],
        "type": "message",
        "idempotency_key": msg["event_id"],
        "network": "sms",
        "remote_id": REMOTE,
        "ghost_id": GHOST,
        "user_id": USER,
        "room_id": ROOM,
        "queued_at": item["queued_at"],
        "message": {
            "event_id": msg["event_id"],
            "sender": {"user_id": USER, "displayname": "Alice"},
            "recipient": REMOTE,
            "msgtype": "m.text",
            "text": "hi *there*",
            "html": "hi <em>there</em>",
            "media": None,
            "reply_to": None,
            "thread_root": None,
            "sent_at": 1_700_000_000_123,
        },
    }
    assert rec.queued == [{"sms"}]
    assert await history(stores) == []


async def test_plain_message_has_no_html_and_the_latest_displayname(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores, user_name=None)
    # A displayname change arrives as a join event; a formatted_body without the html format
    # is not html.
    await send(h, member(USER, "join", displayname="Alice A."),
               message(body="plain", formatted_body="<b>x</b>"),
               message(body="", msgtype="m.emote"))
    first, second = await outbox(stores)
    assert first["message"]["html"] is None
    assert first["message"]["sender"]["displayname"] == "Alice A."
    assert (second["message"]["msgtype"], second["message"]["text"]) == ("m.emote", "")
    assert (await dm_of(stores)).state == ACTIVE  # the user's own join is no third party


async def test_a_resent_event_is_not_queued_twice(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, rec = handler
    await open_dm(stores)
    msg = message()
    await h.handle_transaction("txn-a", [msg])
    await h.handle_transaction("txn-b", [msg])  # a homeserver restarted its transaction IDs
    await h.handle_transaction("txn-a", [msg])
    assert len(await outbox(stores)) == 1
    assert rec.queued == [{"sms"}]


async def test_a_resent_leave_is_not_noticed_twice(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores)
    leave = member(USER, "leave")
    await send(h, leave)
    await send(h, leave)
    assert len(await outbox(stores)) == 1
    assert len(await history(stores)) == 1


@pytest.mark.parametrize("sender", [GHOST, STRANGER, BOT])
async def test_messages_from_anyone_but_the_user_are_not_queued(
    stores: Stores, handler: tuple[MatrixHandler, Recorder], sender: str
) -> None:
    h, rec = handler
    await open_dm(stores)
    await send(h, message(sender=sender))
    assert await outbox(stores) == []
    assert rec.queued == []


async def test_an_encrypted_message_left_encrypted_is_told_not_delivered(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    told: list[list[tuple[str, str, str]]] = []
    h.on_undecryptable = told.append
    await open_dm(stores)
    encrypted = new_event_id()
    await send(
        h,
        {"type": "m.room.encrypted", "room_id": ROOM, "sender": USER, "event_id": encrypted,
         "origin_server_ts": 1, "content": {"algorithm": "m.megolm.v1.aes-sha2"}},
        {"type": "m.reaction", "room_id": ROOM, "sender": USER, "event_id": new_event_id(),
         "origin_server_ts": 1, "content": {}},
    )
    [item] = await outbox(stores)
    assert item["type"] == "message.undecryptable"
    assert item["message.undecryptable"] == {"event_id": encrypted, "reason": "encryption_off",
                                             "sent_at": 1}
    assert told == [[(GHOST, ROOM, encrypted)]]


async def test_a_sticker_is_queued(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores)
    sticker = {"type": "m.sticker", "room_id": ROOM, "sender": USER, "event_id": new_event_id(),
               "origin_server_ts": 5, "content": {"body": "a cat", "url": "mxc://x/y"}}
    await send(h, sticker)
    [item] = await outbox(stores)
    assert item["message"]["text"] == "a cat"
    assert item["message"]["msgtype"] == "m.sticker"
    assert item["message"]["media"]["content_uri"] == "mxc://x/y"
    assert item["message"]["media"]["name"] is None


async def test_writing_in_an_ended_room_with_the_ghost_makes_it_the_dm_again(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, rec = handler
    await open_dm(stores)
    join = member(STRANGER, "join")
    await send(h, join)
    await send(h, member(STRANGER, "leave"))
    assert (await dm_of(stores)).state == ENDED
    msg = message(body="back to us two")
    await send(h, msg)
    dm = await dm_of(stores)
    assert (dm.state, dm.reason) == (ACTIVE, "user_wrote")
    ended, started, queued = await outbox(stores)
    assert notice(ended)[:3] == ("dm.ended", "ended", "third_party_joined")
    assert notice(started) == ("dm.started", "active", "user_wrote", msg["event_id"])
    assert (queued["type"], queued["idempotency_key"]) == ("message", msg["event_id"])
    assert await history(stores) == [
        (ROOM, ENDED, "third_party_joined", join["event_id"]),
        (ROOM, ACTIVE, "user_wrote", msg["event_id"]),
    ]
    assert rec.queued[-1] == {"sms"}


async def test_writing_in_an_older_room_replaces_the_current_dm(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    old, new = "!old:example.org", "!new:example.org"
    await open_dm(stores, old)
    await send(h, member(STRANGER, "join", room_id=old), member(STRANGER, "leave", room_id=old))
    await open_dm(stores, new)
    msg = message(room_id=old)
    await send(h, msg)
    assert ((await dm_of(stores, old)).state, (await dm_of(stores, old)).reason) == (
        ACTIVE, "user_wrote")
    assert ((await dm_of(stores, new)).state, (await dm_of(stores, new)).reason) == (
        ENDED, "replaced")
    assert (await history(stores))[-2:] == [
        (new, ENDED, "replaced", msg["event_id"]),
        (old, ACTIVE, "user_wrote", msg["event_id"]),
    ]
    types = [i["type"] for i in await outbox(stores)]
    assert types == ["dm.ended", "dm.started", "message"]  # no notice for the replaced room


async def test_writing_lifts_a_decline_when_the_ghost_is_still_there(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores, user="invite")
    reject = member(USER, "leave")
    await send(h, reject)
    join = member(USER, "join")
    msg = message(body="changed my mind")
    await send(h, join, msg)
    dm = await dm_of(stores)
    assert (dm.state, dm.reason) == (ACTIVE, "user_wrote")
    assert [notice(i) for i in (await outbox(stores))[:2]] == [
        ("dm.declined", "declined", "invite_rejected", reject["event_id"]),
        ("dm.started", "active", "user_wrote", msg["event_id"]),
    ]
    assert (await outbox(stores))[2]["idempotency_key"] == msg["event_id"]
    # The room went from declined straight back to active: it was never "ended, replaced".
    assert await history(stores) == [
        (ROOM, DECLINED, "invite_rejected", reject["event_id"]),
        (ROOM, ACTIVE, "user_wrote", msg["event_id"]),
    ]


async def test_writing_where_the_ghost_is_gone_delivers_nothing(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores)
    await send(h, member(GHOST, "leave", sender=USER))
    await send(h, message(body="hello?"))
    dm = await dm_of(stores)
    assert (dm.state, dm.reason) == (DECLINED, "ghost_kicked")
    assert [i["type"] for i in await outbox(stores)] == ["dm.declined"]
    assert len(await history(stores)) == 1


# --- failures -------------------------------------------------------------------------------


async def test_an_event_that_fails_is_skipped_and_the_rest_applied(
    stores: Stores, handler: tuple[MatrixHandler, Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    h, _ = handler
    await open_dm(stores)
    bad, good = message(body="bad"), message(body="good")
    apply = h.lifecycle.apply

    async def failing(conn: Any, raw: dict[str, Any], *args: Any) -> None:
        await apply(conn, raw, *args)  # it writes its outbox row, then fails: rolled back
        if raw["event_id"] == bad["event_id"]:
            raise RuntimeError("boom")

    h.lifecycle.apply = failing  # type: ignore[method-assign]
    await send(h, bad, good)
    [item] = await outbox(stores)
    assert item["idempotency_key"] == good["event_id"]
    assert bad["event_id"] in caplog.text
    # The bad event counts as processed: a resend does not apply it again.
    h.lifecycle.apply = apply  # type: ignore[method-assign]
    await send(h, bad)
    assert [i["idempotency_key"] for i in await outbox(stores)] == [good["event_id"]]
    assert (await dm_of(stores)).state == ACTIVE


class Deliverer:
    """A deliverer the recording hands its new items to, leased as they are recorded."""

    def __init__(self) -> None:
        self.taken: list[OutboxItem] = []
        self.unused_tokens: list[str] = []
        self._tokens = itertools.count()

    def lease(self, network: str, now: int) -> tuple[int, str]:
        return now + 60_000, f"test-{next(self._tokens)}"

    def unused(self, token: str) -> None:
        self.unused_tokens.append(token)

    def take(self, items: list[OutboxItem]) -> None:
        self.taken += items


async def test_a_reply_behind_another_gives_its_lease_back(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    deliverer = Deliverer()
    h.handoff = deliverer
    await open_dm(stores)
    await send(h, message(body="one"), message(body="two"))
    first, second = deliverer.taken
    assert first.lease_token == "test-0" and second.lease_token is None  # waits its turn
    assert deliverer.unused_tokens == ["test-1"]  # so the deliverer does not count it as held


async def test_a_failed_event_hands_nothing_to_delivery(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    deliverer = Deliverer()
    h.handoff = deliverer
    await open_dm(stores)
    bad, good = message(body="bad"), message(body="good")
    apply = h.lifecycle.apply

    async def failing(conn: Any, raw: dict[str, Any], *args: Any) -> None:
        await apply(conn, raw, *args)  # it queues (and hands over) its item, then fails
        if raw["event_id"] == bad["event_id"]:
            raise RuntimeError("boom")

    h.lifecycle.apply = failing  # type: ignore[method-assign]
    await send(h, bad, good)
    # Only the item that was kept goes to delivery: the row, leased as it was handed over.
    [handed] = deliverer.taken
    assert handed.idempotency_key == good["event_id"]
    [item] = await outbox(stores)
    assert item["id"] == handed.id and item["idempotency_key"] == good["event_id"]
    stored = await stores.outbox.get(handed.id)
    assert stored is not None and stored.lease_token == handed.lease_token is not None


async def test_an_undecryptable_message_whose_event_failed_is_not_told(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    """Each event's effects are kept only with it: of two encrypted messages the bridge cannot
    read, the one whose recording failed is neither told to the user nor handed to delivery."""
    h, _ = handler
    deliverer = Deliverer()
    h.handoff = deliverer
    told: list[list[tuple[str, str, str]]] = []
    h.on_undecryptable = told.append
    await open_dm(stores)
    bad, good = new_event_id(), new_event_id()
    apply = h.lifecycle.apply

    async def failing(conn: Any, raw: dict[str, Any], *args: Any) -> None:
        await apply(conn, raw, *args)  # it queues its item and notes the user is owed a word
        if raw["event_id"] == bad:
            raise RuntimeError("boom")

    h.lifecycle.apply = failing  # type: ignore[method-assign]
    await send(h, *({"type": "m.room.encrypted", "room_id": ROOM, "sender": USER,
                     "event_id": event_id, "origin_server_ts": 1,
                     "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
                    for event_id in (bad, good)))
    assert told == [[(GHOST, ROOM, good)]]
    [handed] = deliverer.taken
    assert handed.type == "message.undecryptable"
    assert handed.event()["message.undecryptable"]["event_id"] == good
    [item] = await outbox(stores)
    assert item["id"] == handed.id


async def test_typing_told_by_a_failed_event_is_told_again(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores)
    typing = {"type": "m.typing", "room_id": ROOM, "content": {"user_ids": [USER]}}
    apply = h.lifecycle.apply_ephemeral

    async def failing(*args: Any) -> None:
        await apply(*args)  # queues "typing", then fails: rolled back
        raise RuntimeError("boom")

    h.lifecycle.apply_ephemeral = failing  # type: ignore[method-assign]
    await h.handle_transaction("txn-typing-fails", [], [typing])
    assert await outbox(stores) == []
    h.lifecycle.apply_ephemeral = apply  # type: ignore[method-assign]
    await h.handle_transaction("txn-typing-again", [], [typing])
    assert [(i["type"], i["typing"]) for i in await outbox(stores)] == [("typing", True)]


async def test_typing_recorded_while_another_process_writes_waits_for_it(
    stores: Stores, handler: tuple[MatrixHandler, Recorder], tmp_path: Path
) -> None:
    """A transaction of typing notifications only reads before it writes: on SQLite it must
    wait for another process's write (``dmbridge forget``, say) rather than fail at once."""
    if stores.outbox.locks_lanes:
        pytest.skip("PostgreSQL writers wait for one another anyway")
    h, _ = handler
    await open_dm(stores)
    holding, done = threading.Event(), threading.Event()

    def other_process() -> None:
        other = sqlite3.connect(tmp_path / "dmbridge.db", isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # holds the write lock ...
            holding.set()
            done.wait(0.5)  # ... for a while
            other.execute("COMMIT")
        finally:
            other.close()

    loop = asyncio.get_running_loop()
    writer = loop.run_in_executor(None, other_process)
    await loop.run_in_executor(None, holding.wait, 10)
    typing = {"type": "m.typing", "room_id": ROOM, "content": {"user_ids": [USER]}}
    try:
        await h.handle_transaction("txn-typing-while-locked", [], [typing])
    finally:
        done.set()
        await writer
    assert [(i["type"], i["typing"]) for i in await outbox(stores)] == [("typing", True)]


async def test_a_failing_membership_rolls_back_its_own_writes_only(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores)
    kick = member(GHOST, "leave", sender=USER)
    join = member(STRANGER, "join", room_id="!elsewhere:example.org")
    apply = h.lifecycle.apply

    async def failing(conn: Any, raw: dict[str, Any], *args: Any) -> None:
        await apply(conn, raw, *args)
        if raw["event_id"] == kick["event_id"]:
            raise RuntimeError("boom")

    h.lifecycle.apply = failing  # type: ignore[method-assign]
    await send(h, kick, join)
    dm = await dm_of(stores)
    assert (dm.state, dm.ghost_membership) == (ACTIVE, "join")  # the kick left no trace
    assert await outbox(stores) == []
    assert await history(stores) == []
    assert await stores.members.get("!elsewhere:example.org", STRANGER) == "join"


async def test_malformed_events_are_skipped(
    stores: Stores, handler: tuple[MatrixHandler, Recorder]
) -> None:
    h, _ = handler
    await open_dm(stores)
    good = message()
    await send(
        h,
        "not an event",
        {"type": "m.room.message", "room_id": ROOM, "sender": USER},  # no event_id
        {"type": "m.room.message", "room_id": ROOM, "sender": USER, "event_id": new_event_id(),
         "content": "text"},
        {"type": "m.room.member", "room_id": ROOM, "sender": USER, "event_id": new_event_id(),
         "content": {"membership": "leave"}},  # no state_key
        {"type": "m.room.member", "room_id": ROOM, "sender": USER, "state_key": USER,
         "event_id": new_event_id(), "content": {"membership": "sideways"}},
        good,
    )
    [item] = await outbox(stores)
    assert item["idempotency_key"] == good["event_id"]
    assert (await dm_of(stores)).state == ACTIVE


# --- an admin lifting a decline, and the state cache ----------------------------------------


async def test_clear_declined(stores: Stores, handler: tuple[MatrixHandler, Recorder]) -> None:
    h, _ = handler
    await open_dm(stores)
    with pytest.raises(NotFound):
        await clear_declined(stores, SMS, REMOTE, USER)  # active, not declined
    await send(h, member(GHOST, "ban", sender=USER))
    await clear_declined(stores, SMS, REMOTE, USER)
    dm = await dm_of(stores)
    assert (dm.state, dm.reason) == (ENDED, "cleared_by_admin")
    declined, cleared = await outbox(stores)
    assert declined["type"] == "dm.declined"
    assert notice(cleared) == ("dm.cleared", "ended", "cleared_by_admin", None)
    assert cleared["idempotency_key"].startswith("dm.cleared:sms:+15551234567:@alice:")
    assert (await history(stores))[-1] == (ROOM, ENDED, "cleared_by_admin", None)
    with pytest.raises(NotFound):
        await clear_declined(stores, SMS, REMOTE, USER)  # nothing left to clear
    assert await stores.dms.claim(GHOST, USER, "sms", REMOTE, "fresh", "test", now_ms())


async def test_state_cache_gets_new_state_events_only(stores: Stores) -> None:
    h, _ = make_handler(stores)
    seen: list[str] = []

    async def update_state(event: Any) -> None:
        seen.append(str(event.event_id))
        if len(seen) == 1:
            raise RuntimeError("cache trouble")  # after the commit: logged, not raised

    h.appservice.state_store.update_state = update_state
    await open_dm(stores)
    leave, msg = member(STRANGER, "leave"), message()
    join = member(STRANGER, "join")
    await send(h, join, msg, leave)
    assert seen == [join["event_id"], leave["event_id"]]
    await send(h, join)  # already processed: not again
    assert len(seen) == 2
    assert (await dm_of(stores)).state == ENDED


# --- the user told what was not delivered ---------------------------------------------------


async def told(stores: Stores) -> list[tuple[str, str, str, str]]:
    rows = await stores.db.fetch("SELECT event_id, room_id, ghost_id, reason FROM"
                                 " undelivered_notice ORDER BY created_at, event_id")
    return [(r["event_id"], r["room_id"], r["ghost_id"], r["reason"]) for r in rows]


async def test_a_message_in_a_room_someone_else_joined_is_owed_a_notice_once(
    stores: Stores
) -> None:
    h, _ = make_handler(stores)
    woken: list[bool] = []
    h.on_undelivered = lambda: woken.append(True)
    await open_dm(stores)
    await send(h, member(STRANGER, "join"))
    said = message(body="just us?")
    await send(h, said)
    await send(h, said)  # the transaction resent: nothing more
    reaction = {"type": "m.reaction", "room_id": ROOM, "sender": USER,
                "event_id": new_event_id(), "content": {"m.relates_to": {
                    "rel_type": "m.annotation", "event_id": said["event_id"], "key": "+1"}}}
    await send(h, reaction)  # reactions are not told
    assert await told(stores) == [(said["event_id"], ROOM, GHOST, "not_a_dm")]
    assert woken == [True]
    assert [i["type"] for i in await outbox(stores)] == ["dm.ended"]


async def test_a_room_that_stopped_being_a_dm_is_told_so_once_not_at_every_message(
    stores: Stores
) -> None:
    h, _ = make_handler(stores)
    await open_dm(stores)
    await send(h, member(STRANGER, "join"))
    first = message(body="hi both")
    await send(h, first)
    await send(h, message(body="what do you think?"))
    await send(h, message(body="* hi all", **{
        "m.new_content": {"msgtype": "m.text", "body": "hi all"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": first["event_id"]}}))
    assert await told(stores) == [(first["event_id"], ROOM, GHOST, "not_a_dm")]


async def test_a_room_ended_again_later_is_told_again(stores: Stores) -> None:
    h, _ = make_handler(stores)
    await open_dm(stores)
    async with stores.db.acquire() as conn:
        await stores.dms.set_state(conn, ROOM, ENDED, "being_replaced", now_ms() - 10_000)
    first = message(body="still here?")
    await send(h, first)
    async with stores.db.acquire() as conn:
        await stores.dms.set_state(conn, ROOM, ENDED, "being_replaced", now_ms() + 10_000)
    again = message(body="and now?")
    await send(h, again)
    assert [e for e, _, _, _ in await told(stores)] == [first["event_id"], again["event_id"]]


async def test_a_message_in_a_room_the_platform_is_leaving_is_owed_a_notice(
    stores: Stores
) -> None:
    h, _ = make_handler(stores)
    await open_dm(stores)
    async with stores.db.acquire() as conn:
        await stores.dms.set_state(conn, ROOM, ENDED, "being_replaced", now_ms())
    said = message(body="still here?")
    await send(h, said)
    assert await told(stores) == [(said["event_id"], ROOM, GHOST, "elsewhere")]
    assert await outbox(stores) == []


async def test_nobody_is_left_to_tell_where_the_ghost_is_gone(stores: Stores) -> None:
    h, _ = make_handler(stores)
    await open_dm(stores)
    await send(h, member(GHOST, "leave", sender=USER))
    await send(h, message(body="hello?"))
    await send(h, member(STRANGER, "join"))
    await send(h, message(body="anyone?"))
    assert await told(stores) == []


async def test_a_delivered_message_owes_no_notice(stores: Stores) -> None:
    h, _ = make_handler(stores)
    await open_dm(stores)
    await send(h, message(body="hi"))
    assert await told(stores) == []
    assert [i["type"] for i in await outbox(stores)] == ["message"]
