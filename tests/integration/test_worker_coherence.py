"""A DM ended or moved through one worker is respected by the next send through another.

Two workers on one PostgreSQL: the homeserver's transactions reach only the first (A, the one
the registration names), so every change of a DM is recorded by A; the platform sends through
the second (B), which has sent to the DM before the change, so anything B remembers of it is
stale afterwards. Each send through B comes as soon as the platform has been told of the
change (its feed), with no pause: B must act on what the database says.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from dmbridge.bridge import Bridge
from tests.integration import test_workers
from tests.integration.conftest import NewHuman, accept_dm, wait_for
from tests.integration.test_workers import Workers
from tests.support.feed import Feed
from tests.support.matrix import Human
from tests.support.settings import CHAT_TOKEN

pytestmark = pytest.mark.integration

NET = "chat"
# The two workers of test_workers, and their PostgreSQL database.
workers, pg_url = test_workers.workers, test_workers.pg_url


def _ghost(bridge: Bridge, contact: str) -> str:
    return bridge.settings.networks.get(NET).ghost_user_id(contact)


async def _send(workers: Workers, worker: int, human: Human, contact: str, text: str
                ) -> tuple[int, Any]:
    return await workers.platforms[worker].send(NET, CHAT_TOKEN, uuid.uuid4().hex,
                                                sender=contact, recipient=human.user_id,
                                                text=text)


async def _sent(workers: Workers, worker: int, human: Human, contact: str, text: str
                ) -> dict[str, Any]:
    status, body = await _send(workers, worker, human, contact, text)
    assert status == 200, body
    return dict(body)


async def _lands(human: Human, room_id: str, text: str) -> None:
    """The human's client shows ``text`` as the newest message of the room."""
    async def shown() -> bool:
        messages = await human.messages(room_id)
        return bool(messages) and messages[-1]["content"]["body"] == text
    await wait_for(shown, what=f"{text!r} in {room_id}")


async def _warm_dm(workers: Workers, human: Human, contact: str) -> str:
    """A DM opened through B, joined by the human (recorded by A), and written to through B
    again: B has used this DM as it is now."""
    room_id = str((await _sent(workers, 1, human, contact, "hello"))["room_id"])
    await accept_dm(human, room_id, workers.bridges[0])
    again = await _sent(workers, 1, human, contact, "still there?")
    assert again["room_id"] == room_id and again["room_created"] is False
    await _lands(human, room_id, "still there?")
    return room_id


async def test_a_leave_seen_by_one_worker_makes_the_next_send_through_another_invite_back(
    workers: Workers, new_human: NewHuman,
) -> None:
    human, contact = await new_human(), f"c{uuid.uuid4().hex[:12]}"
    feed = Feed(workers.platforms[1])
    room_id = await _warm_dm(workers, human, contact)
    human.invites.clear()
    await human.leave(room_id)
    left = await feed.expect("dm.user_left", room_id=room_id)
    assert left["dm"]["state"] == "active"  # dm.on_leave: reinvite

    again = await _sent(workers, 1, human, contact, "come back")
    assert again["room_id"] == room_id and again["room_created"] is False
    invite = await human.wait_invite(room_id)  # a stale "joined" would have sent it unseen
    assert invite.content.get("is_direct") is True
    await human.join(room_id)
    await _lands(human, room_id, "come back")


async def test_a_third_party_seen_by_one_worker_makes_the_next_send_through_another_open_a_dm(
    workers: Workers, new_human: NewHuman,
) -> None:
    human, friend = await new_human(), await new_human()
    contact = f"c{uuid.uuid4().hex[:12]}"
    feed = Feed(workers.platforms[1])
    room_id = await _warm_dm(workers, human, contact)
    await human.client.room_invite(room_id, friend.user_id)
    await friend.wait_invite(room_id)
    await friend.join(room_id)
    ended = await feed.expect("dm.ended", room_id=room_id)
    assert ended["dm"]["reason"] == "third_party_joined"

    fresh = await _sent(workers, 1, human, contact, "a private word")
    assert fresh["room_id"] != room_id and fresh["room_created"] is True
    await human.wait_invite(fresh["room_id"])
    await human.join(fresh["room_id"])
    await _lands(human, fresh["room_id"], "a private word")
    # The friend never saw it: the old room's newest message is from before they came.
    assert (await friend.messages(room_id))[-1]["content"]["body"] == "still there?"


async def test_a_decline_seen_by_one_worker_refuses_the_next_send_through_another(
    workers: Workers, new_human: NewHuman,
) -> None:
    human, contact = await new_human(), f"c{uuid.uuid4().hex[:12]}"
    feed = Feed(workers.platforms[1])
    first = await _sent(workers, 1, human, contact, "hello")
    again = await _sent(workers, 1, human, contact, "hello again")  # B has used the DM
    assert again["room_id"] == first["room_id"] and again["room_created"] is False
    await human.wait_invite(first["room_id"])
    await human.reject(first["room_id"])
    await feed.expect("dm.declined", room_id=first["room_id"], reason="invite_rejected")

    status, body = await _send(workers, 1, human, contact, "anyone there?")
    assert status == 403 and body["errcode"] == "DMBRIDGE_DECLINED", body
    # Nothing reached Matrix: the human's next invite is another contact's.
    human.invites.clear()
    marker = await _sent(workers, 1, human, f"c{uuid.uuid4().hex[:12]}", "someone else")
    await human.wait_invite(marker["room_id"])
    assert set(human.invites) == {marker["room_id"]}


async def test_a_dm_started_from_matrix_seen_by_one_worker_gets_the_next_send_through_another(
    workers: Workers, new_human: NewHuman,
) -> None:
    human, contact = await new_human(), f"c{uuid.uuid4().hex[:12]}"
    feed = Feed(workers.platforms[1])
    old_room = await _warm_dm(workers, human, contact)
    new_room = await human.create_dm(_ghost(workers.bridges[0], contact))
    started = await feed.expect("dm.started", room_id=new_room)
    assert started["dm"]["reason"] == "user_invited"

    sent = await _sent(workers, 1, human, contact, "over here now")
    assert sent["room_id"] == new_room and sent["room_created"] is False
    await _lands(human, new_room, "over here now")
    assert (await human.messages(old_room))[-1]["content"]["body"] == "still there?"
