"""An invite is answered by one worker at a time: the lease on it, on both database backends."""

from __future__ import annotations

from mautrix.util.async_db import Connection

from dmbridge.db import Stores
from dmbridge.db.invite import GhostInvite

INVITE = GhostInvite(room_id="!r:example.org", ghost_id="@dm_sms_1:example.org",
                     inviter="@alice:example.org", is_direct=True, event_id="$invite",
                     received_at=1000)


async def _record(stores: Stores, invite: GhostInvite) -> None:
    conn: Connection
    async with stores.db.acquire() as conn:
        await stores.invites.add(conn, invite)


async def test_one_worker_holds_an_invite_until_it_lets_go_or_the_lease_runs_out(
    stores: Stores,
) -> None:
    await _record(stores, INVITE)
    assert await stores.invites.unleased(2000) == [INVITE]
    assert await stores.invites.lease(INVITE, "a", 2000, 5000)
    assert not await stores.invites.lease(INVITE, "b", 2001, 5001)
    assert await stores.invites.unleased(2001) == []
    await stores.invites.release(INVITE, "b")  # not b's to let go
    assert not await stores.invites.lease(INVITE, "b", 2002, 5002)
    # a's process died: its lease runs out, and b takes the invite over.
    assert await stores.invites.unleased(5001) == [INVITE]
    assert await stores.invites.lease(INVITE, "b", 5001, 9000)
    await stores.invites.release(INVITE, "a")  # a, back late, does not take it from b
    assert not await stores.invites.lease(INVITE, "c", 5002, 9000)
    await stores.invites.release(INVITE, "b")
    assert await stores.invites.unleased(5003) == [INVITE]
    await stores.invites.done(INVITE)
    assert not await stores.invites.lease(INVITE, "c", 5004, 9000)  # answered: gone


async def test_a_newer_invite_of_a_leased_one_waits_for_the_lease(stores: Stores) -> None:
    """The user invited the ghost again while a worker answers the first invite: the newer one
    is answered once that worker lets go (its answer leaves the newer invite in place)."""
    await _record(stores, INVITE)
    assert await stores.invites.lease(INVITE, "a", 2000, 5000)
    newer = GhostInvite(**{**INVITE.__dict__, "event_id": "$again", "received_at": 2100})
    await _record(stores, newer)
    assert await stores.invites.unleased(2200) == []
    await stores.invites.done(INVITE)  # the first invite's answer
    await stores.invites.release(INVITE, "a")
    assert await stores.invites.unleased(2300) == [newer]
