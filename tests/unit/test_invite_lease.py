"""An invite is answered by one worker at a time: the lease on it, on both database backends."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import pytest
from mautrix.util.async_db import Connection, Scheme

from dmbridge.db import Stores
from dmbridge.db.invite import GhostInvite
from dmbridge.invites import InviteHandler

INVITE = GhostInvite(room_id="!r:example.org", ghost_id="@dm_sms_1:example.org",
                     inviter="@alice:example.org", is_direct=True, event_id="$invite",
                     received_at=1000)
LONG = 600_000  # ms: a lease that does not run out during a test


async def _record(stores: Stores, invite: GhostInvite) -> None:
    conn: Connection
    async with stores.db.acquire() as conn:
        await stores.invites.add(conn, invite)


async def _run_out(stores: Stores, invite: GhostInvite) -> None:
    """The lease's end moves to long ago, as if its worker had stopped renewing it."""
    await stores.db.execute(
        "UPDATE ghost_invite SET lease_until=lease_until - $3 WHERE room_id=$1 AND ghost_id=$2",
        invite.room_id, invite.ghost_id, 10 * LONG,
    )


async def test_one_worker_holds_an_invite_until_it_lets_go_or_the_lease_runs_out(
    stores: Stores,
) -> None:
    await _record(stores, INVITE)
    assert await stores.invites.unleased() == [INVITE]
    assert await stores.invites.lease(INVITE, "a", LONG)
    assert not await stores.invites.lease(INVITE, "b", LONG)
    assert await stores.invites.unleased() == []
    await stores.invites.release(INVITE, "b")  # not b's to let go
    assert not await stores.invites.lease(INVITE, "b", LONG)
    # a's process died: its lease runs out, and b takes the invite over.
    await _run_out(stores, INVITE)
    assert await stores.invites.unleased() == [INVITE]
    assert not await stores.invites.renew(INVITE, "b", LONG)  # b holds nothing to renew yet
    assert await stores.invites.lease(INVITE, "b", LONG)
    assert not await stores.invites.renew(INVITE, "a", LONG)  # a, back late, has lost it
    await stores.invites.release(INVITE, "a")  # nor does it take it from b
    assert not await stores.invites.lease(INVITE, "c", LONG)
    await stores.invites.release(INVITE, "b")
    assert await stores.invites.unleased() == [INVITE]
    await stores.invites.done(INVITE)
    assert not await stores.invites.lease(INVITE, "c", LONG)  # answered: gone


async def test_a_renewed_lease_lasts_past_its_length(stores: Stores) -> None:
    await _record(stores, INVITE)
    assert await stores.invites.lease(INVITE, "a", LONG)
    await _run_out(stores, INVITE)  # the lease as it was would have run out by now
    assert await stores.invites.renew(INVITE, "a", LONG)
    assert await stores.invites.unleased() == []
    assert not await stores.invites.lease(INVITE, "b", LONG)


async def test_a_lease_is_counted_on_the_databases_clock_not_the_hosts(
    stores: Stores, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker whose host clock runs an hour ahead does not take another worker's lease. (The
    host's clock is what ``now_ms`` and ``time.time`` read: a lease counted on it fails here.)"""
    await _record(stores, INVITE)
    assert await stores.invites.lease(INVITE, "a", LONG)
    ahead = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: ahead)
    assert await stores.invites.unleased() == []
    assert not await stores.invites.lease(INVITE, "b", LONG)


async def test_a_newer_invite_of_a_leased_one_waits_for_the_lease(stores: Stores) -> None:
    """The user invited the ghost again while a worker answers the first invite: the newer one
    is answered once that worker lets go (its answer leaves the newer invite in place)."""
    await _record(stores, INVITE)
    assert await stores.invites.lease(INVITE, "a", LONG)
    newer = GhostInvite(**{**INVITE.__dict__, "event_id": "$again", "received_at": 2100})
    await _record(stores, newer)
    assert await stores.invites.unleased() == []
    await stores.invites.done(INVITE)  # the first invite's answer
    await stores.invites.release(INVITE, "a")
    assert await stores.invites.unleased() == [newer]


class SlowAnswers(InviteHandler):
    """Answers take ``seconds`` each and are only recorded (no homeserver)."""

    def __init__(self, stores: Stores, lease_s: float, seconds: float) -> None:
        nothing = cast(Any, None)
        super().__init__(stores=stores, networks=nothing, ghosts=nothing, appservice=nothing,
                         dms=nothing, queued=lambda networks: None, lease_s=lease_s)
        self.seconds = seconds
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.stopped = asyncio.Event()
        self.answered: list[GhostInvite] = []

    async def answer(self, invite: GhostInvite) -> None:
        self.started.set()
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.stopped.set()
            raise
        self.answered.append(invite)
        await self.stores.invites.done(invite)
        self.finished.set()


async def test_an_answer_longer_than_the_lease_keeps_it(stores: Stores) -> None:
    """The worker renews its lease while the homeserver keeps the answer waiting: no other
    worker takes the invite over meanwhile, and it is answered once."""
    await _record(stores, INVITE)
    worker = SlowAnswers(stores, lease_s=1.0, seconds=5.0)
    worker.start()
    try:
        await asyncio.wait_for(worker.started.wait(), 10)
        # Whenever the lease as taken would have run out, a renewal moves its end on again.
        while await _renewed_after_running_out(stores, INVITE, worker.finished):
            assert not await stores.invites.lease(INVITE, "other", LONG)
    finally:
        await worker.stop()
    assert worker.answered == [INVITE]
    assert await stores.invites.all() == []


async def _renewed_after_running_out(stores: Stores, invite: GhostInvite,
                                     finished: asyncio.Event) -> bool:
    """Run the lease out, then wait for a renewal to put its end in the future again; False
    once the answer has finished."""
    if finished.is_set():
        return False
    await _run_out(stores, invite)
    for _ in range(200):  # a renewal comes every third of the lease
        if finished.is_set():
            return False
        if await stores.invites.unleased() == []:
            return True
        await asyncio.sleep(0.05)
    raise AssertionError("the lease was not renewed within 10 s")


async def test_an_answer_stops_when_another_worker_took_its_lease(stores: Stores) -> None:
    """The lease ran out (the worker's database connection stalled) and another worker took
    the invite: the first one's answer stops, so the invite is answered by one worker only."""
    await _record(stores, INVITE)
    worker = SlowAnswers(stores, lease_s=1.0, seconds=5.0)
    worker.start()
    try:
        await asyncio.wait_for(worker.started.wait(), 10)
        await _run_out(stores, INVITE)
        assert await stores.invites.lease(INVITE, "other", LONG)
        await asyncio.wait_for(worker.stopped.wait(), 10)
    finally:
        await worker.stop()
    assert worker.answered == []
    assert await stores.invites.all() == [INVITE]  # the other worker's to answer


async def test_a_restarted_bridge_on_sqlite_answers_its_previous_processs_invites_at_once(
    stores: Stores, caplog: pytest.LogCaptureFixture,
) -> None:
    """SQLite takes one process: a lease not the new process's is a dead process's, so the
    invite is answered now, not once the lease runs out."""
    if stores.db.scheme != Scheme.SQLITE:
        pytest.skip("several workers share a PostgreSQL database; leases there run out")
    await _record(stores, INVITE)
    assert await stores.invites.lease(INVITE, "killed process", LONG)
    caplog.set_level(logging.INFO, logger="dmbridge.invites")
    worker = SlowAnswers(stores, lease_s=600, seconds=0)
    worker.start()
    try:
        await asyncio.wait_for(worker.finished.wait(), 10)
    finally:
        await worker.stop()
    assert worker.answered == [INVITE]
    assert "took over 1 invite(s) the previous process was answering" in caplog.messages
