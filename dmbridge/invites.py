"""A Matrix user invites a ghost: the ghost joins and the room becomes their DM, or it declines.

Invites are recorded in the transaction that brought them, then answered here; one that was not
answered before a crash is answered after the restart. Every worker sharing the database sees
every invite: a worker answers one only under a lease on it, so each invite is answered once.
The lease is counted on the database's clock and renewed while the answer runs, however long
the homeserver makes it wait; it runs out only when its worker stops renewing it (it died, or
lost the database). SQLite has one process: a restarted bridge takes over at once the leases its
previous process held.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable

import aiohttp
from mautrix.api import Method, Path
from mautrix.appservice import AppService, IntentAPI
from mautrix.errors import MatrixConnectionError, MatrixRequestError, MForbidden
from mautrix.types import RoomID, UserID
from mautrix.util.async_db import Connection, Scheme

from . import bridgeinfo, payloads, wake
from .db import Stores, now_ms
from .db.dm import ACTIVE, CREATING, ENDED, JOINING, DMRecord
from .db.history import Transition
from .db.invite import GhostInvite
from .dms import DMService
from .errors import RateLimited
from .ghostlock import LOCK_FAILURES
from .ghosts import Ghosts
from .jsontext import storable_text
from .lifecycle import move
from .networks import Network, Networks

log = logging.getLogger("dmbridge.invites")
# m.direct could not be updated now; the ghost's next DM repairs it.
_M_DIRECT_LATER: tuple[type[BaseException], ...] = (
    TimeoutError, MatrixRequestError, MatrixConnectionError, aiohttp.ClientError, *LOCK_FAILURES)

RETRY_S = 10.0  # how often invites are looked for without a wake-up
# How long a worker may take to answer an invite before another takes it over: at least this,
# and long enough for each request of an answer (registration, join, members, m.direct read
# and write) to wait out the homeserver's rate limits (rate_limits.background_wait).
MIN_LEASE_S = 120.0
REQUESTS_PER_ANSWER = 5


def lease_seconds(background_wait: float) -> float:
    return max(MIN_LEASE_S, REQUESTS_PER_ANSWER * background_wait)


class InviteHandler:
    def __init__(self, *, stores: Stores, networks: Networks, ghosts: Ghosts,
                 appservice: AppService, dms: DMService,
                 queued: Callable[[set[str]], None], lease_s: float = MIN_LEASE_S,
                 require_encryption: bool = False,
                 before_join: Callable[[UserID, RoomID], Awaitable[None]] | None = None) -> None:
        self.stores = stores
        self.require_encryption = require_encryption  # dm.encryption: require
        # Run just before the ghost joins a room it accepted (its device, in an encrypted room).
        self.before_join = before_join
        self.networks = networks
        self.ghosts = ghosts
        self.appservice = appservice
        self.dms = dms
        self._queued = queued
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._owner = secrets.token_hex(8)
        self._lease_ms = int(lease_s * 1000)

    def start(self) -> None:
        self._wake.set()  # answer what was left over from before a restart
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        if self.stores.db.scheme == Scheme.SQLITE:
            await self._take_over()
        while True:
            await wake.wait(self._wake, RETRY_S)
            self._wake.clear()
            try:
                for invite in await self.stores.invites.unleased():
                    await self._answer_leased(invite)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("answering invites failed; trying again in %.0f s", RETRY_S)

    async def _take_over(self) -> None:
        """SQLite: this is the only process on the database, so a lease held by another owner
        is a previous process's, which ended before its answer did."""
        try:
            taken = await self.stores.invites.release_others(self._owner)
        except Exception:
            log.exception("could not take over the invites of the previous process; they are"
                          " answered once their leases run out")
            return
        if taken:
            log.info("took over %d invite(s) the previous process was answering", taken)

    async def _answer_leased(self, invite: GhostInvite) -> None:
        if not await self.stores.invites.lease(invite, self._owner, self._lease_ms):
            return  # another worker is answering it
        answering = asyncio.create_task(self.answer(invite))
        renewing = asyncio.create_task(self._renew(invite))
        try:
            await asyncio.wait((answering, renewing), return_when=asyncio.FIRST_COMPLETED)
            if answering.done():
                answering.result()  # its failure is this call's
                return
            # The lease is lost: another worker answers the invite now, so this answer stops
            # before it settles the room or tells the platform a second time.
            log.warning("stopped answering the invite of %s to %s: another worker holds it",
                        invite.ghost_id, invite.room_id)
        finally:
            answering.cancel()
            renewing.cancel()
            await asyncio.gather(answering, renewing, return_exceptions=True)
            await asyncio.shield(self.stores.invites.release(invite, self._owner))

    async def _renew(self, invite: GhostInvite) -> None:
        """Every third of the lease, the lease again from now, for as long as the answer runs."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                held = await self.stores.invites.renew(invite, self._owner, self._lease_ms)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("could not renew the lease on the invite of %s to %s: %r",
                            invite.ghost_id, invite.room_id, e)
                continue
            if not held:
                log.warning("the lease on the invite of %s to %s is no longer held (answered,"
                            " or it ran out and another worker took it)", invite.ghost_id,
                            invite.room_id)
                return

    async def answer(self, invite: GhostInvite) -> None:
        parsed = self.networks.parse_ghost(invite.ghost_id)
        if parsed is None:
            await self.stores.invites.done(invite)
            return
        network, remote_id = parsed
        refusal = self._refusal(network, invite)
        if refusal is None and self.require_encryption and (
                await self.stores.encrypted_rooms.get(RoomID(invite.room_id)) is None):
            refusal = (f"{network.name} contacts only take encrypted chats: start the DM with"
                       " encryption on.")
        try:
            await self.ghosts.ensure_registered(network, remote_id)
            if refusal is not None:
                await self._leave(invite, refusal)
                log.info("%s declined the invite of %s to %s: %s", invite.ghost_id,
                         invite.inviter, invite.room_id, refusal)
            else:
                if not await self._accept(network, remote_id, invite):
                    return  # left for the next round
        except (TimeoutError, aiohttp.ClientError, MatrixConnectionError, RateLimited) as e:
            # Left for the next round (RateLimited: the homeserver's limit outlasted
            # rate_limits.background_wait).
            log.warning("could not answer the invite of %s to %s yet: %r", invite.ghost_id,
                        invite.room_id, e)
            return
        except MatrixRequestError as e:
            if not _transient(e):
                raise
            # The homeserver failed (5xx left after the retries): not a refusal of the join.
            log.warning("could not answer the invite of %s to %s yet: %s", invite.ghost_id,
                        invite.room_id, e)
            return
        await self.stores.invites.done(invite)

    def _refusal(self, network: Network, invite: GhostInvite) -> str | None:
        if network.invites_from.nobody:
            return f"{network.name} contacts cannot be messaged first from Matrix."
        if not network.invites_from.allows(invite.inviter):
            return f"You are not permitted to start conversations with {network.name} contacts."
        if not invite.is_direct:
            return f"{network.name} contacts only take direct chats: invite them as a DM."
        return None

    async def _leave(self, invite: GhostInvite, reason: str) -> None:
        try:
            await self.ghosts.intent(UserID(invite.ghost_id)).api.request(
                Method.POST, Path.v3.rooms[RoomID(invite.room_id)].leave,
                content={"reason": reason},
            )
        except MatrixRequestError as e:
            log.info("could not decline the invite to %s (already gone?): %s", invite.room_id, e)

    async def _accept(self, network: Network, remote_id: str, invite: GhostInvite) -> bool:
        """Join and make the room the pair's DM; False to try again later."""
        ghost_id, user_id, room_id = (UserID(invite.ghost_id), UserID(invite.inviter),
                                      RoomID(invite.room_id))
        now = now_ms()
        one_to_one = f"{network.name} contacts only take one-to-one chats."
        previous: DMRecord | None = None
        conn: Connection
        async with self.stores.transaction() as conn:
            existing = await self.stores.dms.by_room(conn, room_id)
            taken = existing is not None and (existing.ghost_id, existing.user_id) != (
                ghost_id, user_id)
            current = await self.stores.dms.current_in(conn, ghost_id, user_id)
            creating = not taken and current is not None and current.state == CREATING
            if not taken and not creating:
                if current is not None and current.room_id != room_id:
                    # The user's newest room wins; the old one comes back if this one fails.
                    previous = current
                    await move(self.stores, conn, current, ENDED, "replaced", invite.event_id,
                               now, None)
                await self.stores.dms.adopt(conn, ghost_id, user_id, network.id, remote_id,
                                            room_id, JOINING, "user_invited", now)
                await self.stores.history.record(conn, Transition(
                    ghost_id, user_id, network.id, remote_id, room_id, JOINING, "user_invited",
                    invite.event_id, now,
                ))
        if creating:
            log.info("%s: a DM for %s / %s is being created; answering the invite later",
                     room_id, ghost_id, user_id)
            await self.dms.settle_if_gone(ghost_id, user_id)  # unless its creator is gone
            return False
        if taken:
            log.info("%s declined the invite to %s: it is already another contact's DM",
                     ghost_id, room_id)
            await self._leave(invite, one_to_one)
            return True
        if self.before_join is not None:
            await self.before_join(ghost_id, room_id)
        intent = self.ghosts.intent(ghost_id)
        try:
            await intent.api.request(Method.POST, Path.v3.rooms[room_id].join, content={})
        except MatrixRequestError as e:
            if _transient(e):
                raise  # answered in a later round
            log.info("%s could not join %s (invite withdrawn?): %s", ghost_id, room_id, e)
            # Refusing the invite with the reason is the one way the inviter hears of it.
            await self._leave(invite, f"The {network.name} contact could not join this room"
                              f" ({_why(e)}), so the chat was not started.")
            await self._finish(room_id, ENDED, "join_failed", invite, None, previous)
            return True
        try:
            members = await _members(intent, room_id)
        except MatrixRequestError as e:
            if _transient(e):
                raise  # answered in a later round
            log.info("%s joined %s but could not read its members: %s", ghost_id, room_id, e)
            await self._leave(invite, f"The {network.name} contact could not see who is in"
                              f" this room ({_why(e)}), so the chat was not started.")
            await self._finish(room_id, ENDED, "join_failed", invite, None, previous)
            return True
        await self.appservice.state_store.joined(room_id, ghost_id)
        await self.stores.members.assume(room_id, ghost_id, "join")
        await self.stores.members.replace(room_id, ghost_id, "invite", "join")
        for member_id, (membership, name) in members.items():
            await self.stores.members.assume(room_id, UserID(member_id), membership, name)
        # Someone else joined: the user meant a group, not a DM. One only invited does not
        # count (a usable DM is one nobody else has joined); if they join, the DM ends.
        others = [m for m, (membership, _) in members.items()
                  if membership == "join" and m not in (ghost_id, user_id)]
        if others:
            await self._leave(invite, one_to_one)
            await self._finish(room_id, ENDED, "not_one_to_one", invite, None, previous)
            return True
        await self._finish(room_id, ACTIVE, "user_invited", invite, payloads.DM_STARTED)
        await self._mark_bridged(network, remote_id, ghost_id, room_id)
        try:
            await self.dms.add_to_m_direct(ghost_id, user_id, room_id)
        except _M_DIRECT_LATER as e:
            # The DM is active; its m.direct entry is repaired by the ghost's next DM.
            log.error("could not list %s in the m.direct of %s: %r", room_id, ghost_id, e)
        log.info("%s joined %s at the invite of %s; it is their DM now", ghost_id, room_id,
                 user_id)
        return True

    async def _mark_bridged(self, network: Network, remote_id: str, ghost_id: UserID,
                            room_id: RoomID) -> None:
        """Give the adopted room the bridge state of the rooms the bridge creates. The room is
        the user's: the ghost can set state only if they gave it the power (a DM created with
        the ``trusted_private_chat`` preset does); otherwise the room goes without it."""
        intent = self.ghosts.intent(ghost_id)
        info = bridgeinfo.content(network, remote_id, ghost_id, self.appservice.bot_mxid)
        key = bridgeinfo.state_key(network, remote_id)
        for kind in bridgeinfo.EVENT_TYPES:
            try:
                await intent.api.request(Method.PUT, Path.v3.rooms[room_id].state[kind][key],
                                         content=info)
            except MForbidden as e:
                log.info("%s: no bridge state: %s may not set state in the user's room (%s)",
                         room_id, ghost_id, e.message)
                return
            except (MatrixRequestError, MatrixConnectionError, aiohttp.ClientError, TimeoutError,
                    RateLimited) as e:  # the DM works without it
                log.warning("%s: could not set the bridge state %s: %r", room_id, kind, e)
                return

    async def _finish(self, room_id: RoomID, state: str, reason: str, invite: GhostInvite,
                      notice: str | None, previous: DMRecord | None = None) -> None:
        """Settle the joining room; on failure the DM it replaced (if any) is the DM again."""
        conn: Connection
        async with self.stores.transaction() as conn:
            dm = await self.stores.dms.by_room(conn, room_id)
            if dm is None or dm.state != JOINING:
                return  # something newer (a leave, a kick) already moved it on
            now = now_ms()
            await move(self.stores, conn, dm, state, reason, invite.event_id, now, notice)
            if previous is not None and previous.room_id is not None and state == ENDED:
                old = await self.stores.dms.by_room(conn, previous.room_id)
                free = await self.stores.dms.current_in(conn, dm.ghost_id, dm.user_id) is None
                if free and old is not None and old.state == ENDED and old.reason == "replaced":
                    await move(self.stores, conn, old, previous.state, "restored",
                               invite.event_id, now, None)
        if notice is not None:
            self._queued({dm.network})


async def _members(intent: IntentAPI, room_id: RoomID) -> dict[str, tuple[str, str | None]]:
    """Who is joined to or invited into the room: user ID -> (membership, display name)."""
    data = await intent.api.request(Method.GET, Path.v3.rooms[room_id].members,
                                    query_params={"not_membership": "leave"})
    found: dict[str, tuple[str, str | None]] = {}
    for event in data.get("chunk", []) if isinstance(data, dict) else []:
        content = event.get("content") if isinstance(event, dict) else None
        user_id = event.get("state_key") if isinstance(event, dict) else None
        if not isinstance(content, dict) or not isinstance(user_id, str):
            continue
        membership = content.get("membership")
        if membership not in ("join", "invite"):
            continue
        name = content.get("displayname")
        found[user_id] = (str(membership),
                          storable_text(name) if isinstance(name, str) and name else None)
    return found


def _transient(e: MatrixRequestError) -> bool:
    """The homeserver failed, rather than refused: worth asking again later."""
    return e.http_status >= 500


def _why(e: MatrixRequestError) -> str:
    """The homeserver's words for a refusal, short enough for a member event's reason."""
    text = e.message or e.errcode or f"HTTP {e.http_status}"
    return text if len(text) <= 200 else text[:199] + "\N{HORIZONTAL ELLIPSIS}"
