"""Open or reuse the one DM room between a ghost and a Matrix user.

A new room is made under a claim on the pair (a 'creating' row naming this process) and carries
a creation marker from its first event, so its outcome is never lost: a claim whose process died
is settled from the homeserver (:mod:`dmbridge.recovery`) at once, and a creation that fails
after ``createRoom`` removes the room it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from mautrix.api import Method, Path
from mautrix.appservice import AppService
from mautrix.errors import MatrixConnectionError, MatrixRequestError, MForbidden, MNotFound
from mautrix.types import EventType, RoomCreatePreset, RoomID, UserID

from . import bridgeinfo, payloads
from .config import Settings
from .db import Stores, now_ms
from .db.dm import ACTIVE, CREATING, DECLINED, ENDED, JOINING, DMRecord
from .encryption import ENCRYPTION_CONTENT, Encryption
from .errors import (
    Busy,
    Declined,
    HomeserverError,
    RecipientUnreachable,
    UnknownRecipient,
)
from .ghostlock import LOCK_FAILURES, GhostLocks, shared_holders
from .ghosts import Ghosts
from .instances import Instances
from .lifecycle import BEING_REPLACED, REPLACED_BY_PLATFORM, move
from .locks import KeyedLocks, LockWaitTimeout
from .marker import Marker
from .networks import Network
from .ratelimit import Pacing, default_budget
from .recovery import Recovery

log = logging.getLogger("dmbridge.opening")

# Room versions where the creator holds power implicitly and must not be in power_levels.users.
_CREATOR_POWER_VERSIONS = frozenset({"12", "org.matrix.hydra.11"})
_DECLINE_WORDING = {
    "invite_rejected": "rejected the invite",
    "ghost_kicked": "removed this contact from the DM",
    "ghost_banned": "banned this contact from the DM",
}
_HS_ERRORS = (TimeoutError, MatrixRequestError, MatrixConnectionError, aiohttp.ClientError)
# What the Matrix user reads in a DM room the platform replaced with a new one (``new: true``).
MOVED_REASON = "This conversation continues in a new room."
# m.direct could not be updated now; the ghost's next DM repairs it.
_M_DIRECT_LATER: tuple[type[BaseException], ...] = (*_HS_ERRORS, *LOCK_FAILURES)


@dataclass(frozen=True)
class DM:
    room_id: RoomID
    network: str
    remote_id: str
    ghost_id: UserID
    user_id: UserID
    user_membership: str | None
    state: str = ACTIVE
    reason: str | None = None

    @classmethod
    def of(cls, record: DMRecord) -> DM:
        assert record.room_id is not None
        return cls(
            room_id=record.room_id, network=record.network, remote_id=record.remote_id,
            ghost_id=record.ghost_id, user_id=record.user_id,
            user_membership=record.user_membership, state=record.state, reason=record.reason,
        )


@dataclass(frozen=True)
class OpenedDM:
    dm: DM
    created: bool
    replaced: RoomID | None = None  # the DM room this request ended (``new: true``)


@dataclass(frozen=True)
class Profile:
    """What the platform says about its user; None leaves that part as it is."""

    name: str | None = None
    avatar: str | None = None


class NoNewRoom(Exception):
    """Only a new room would do, and the caller asked for none."""


class _Changed(Exception):
    """The DM to be replaced is no longer the pair's active DM."""


@asynccontextmanager
async def homeserver_errors(what: str) -> AsyncIterator[None]:
    """Turn a homeserver failure into an error the platform can act on."""
    try:
        yield
    except MatrixRequestError as e:
        raise HomeserverError(f"the homeserver refused to {what}: {e}") from e
    except (TimeoutError, MatrixConnectionError, aiohttp.ClientError) as e:
        raise HomeserverError(f"the homeserver could not be reached to {what}: {e!r}") from e


def declined(record: DMRecord) -> Declined:
    how = _DECLINE_WORDING.get(record.reason or "", "declined DMs from this contact")
    return Declined(
        f"{record.user_id} {how}; nothing more is sent to them until they reach out again"
        f" (reason: {record.reason})"
    )


def _unusable_reason(record: DMRecord) -> str | None:
    """Why this DM room cannot take the next message as it is, or None if it can."""
    if record.ghost_membership != "join":
        return f"the ghost is not in the room ({record.ghost_membership or 'unknown'})"
    if record.others_joined:
        return f"{record.others_joined} other member(s) joined"
    if record.user_membership in ("join", "invite"):
        return None
    return "user-left"


def _federation_denied(e: BaseException) -> bool:
    """Synapse's answer when the recipient's server is not one it may talk to."""
    return isinstance(e, MatrixRequestError) and "Federation denied" in (e.message or "")


class Opener:
    """Finds the pair's usable DM, re-invites into it, or makes a new one."""

    def __init__(self, *, settings: Settings, stores: Stores, appservice: AppService,
                 ghosts: Ghosts, instances: Instances, pacing: Pacing,
                 encryption: Encryption | None = None) -> None:
        self.settings = settings
        self.encryption = encryption
        self.pacing = pacing
        self.stores = stores
        self.appservice = appservice
        self.ghosts = ghosts
        self.instances = instances
        self.recovery = Recovery(stores=stores, ghosts=ghosts)
        self._pair_locks: KeyedLocks[tuple[UserID, UserID]] = KeyedLocks()
        self._direct_locks = GhostLocks(stores.db, holders=shared_holders(settings.db_max_size))
        self._room_version: str | None = None

    async def open(
        self, network: Network, remote_id: str, ghost_id: UserID, user_id: UserID,
        profile: Profile, record: DMRecord | None, *, new_room: bool = True,
        replace: bool = False, replaces: RoomID | None = None,
    ) -> OpenedDM:
        """Reuse the DM looked up as ``record`` if it is usable; otherwise fix or make one.

        ``new_room=False``: reuse (or re-invite into) the current room, never make another.
        ``replace=True``: end the pair's current DM and make a new one; with ``replaces``, only
        if the current DM is still that room (a retry finds it replaced, and reuses the new one).
        """
        if (not replace and record and record.state == ACTIVE
                and _unusable_reason(record) is None):
            await self.sync_profile(network, remote_id, profile, record.ghost_displayname,
                                    record.ghost_avatar_url)
            return OpenedDM(DM.of(record), created=False)
        try:
            async with self._pair_locks.hold((ghost_id, user_id),
                                             wait=self.settings.creation_timeout):
                return await self._open_locked(network, remote_id, ghost_id, user_id, profile,
                                               new_room, replace, replaces)
        except LockWaitTimeout:
            raise Busy(f"the DM between {ghost_id} and {user_id} is still being opened by an"
                       " earlier request") from None

    async def _open_locked(
        self, network: Network, remote_id: str, ghost_id: UserID, user_id: UserID,
        profile: Profile, new_room: bool, replace: bool = False,
        replaces: RoomID | None = None,
    ) -> OpenedDM:
        deadline = time.monotonic() + self.settings.creation_timeout
        while True:
            record = await self.stores.dms.get_current(ghost_id, user_id)
            if record is None:
                if not new_room:
                    raise NoNewRoom
                await self._check_recipient_exists(user_id)
                claim = secrets.token_hex(8)
                await self.instances.ensure_present()
                if await self.stores.dms.claim(
                    ghost_id, user_id, network.id, remote_id, claim, self.instances.id,
                    now_ms(),
                ):
                    opened = await self._create(network, remote_id, ghost_id, user_id, profile,
                                                claim)
                    return opened
                continue  # another worker claimed the pair first; wait for its room
            if record.state == DECLINED:
                raise declined(record)
            if record.state == JOINING:
                # The user invited the ghost and it is joining: that room is about to be the DM.
                if time.monotonic() >= deadline:
                    raise Busy(f"{ghost_id} is still joining the DM {user_id} invited it to")
                await asyncio.sleep(0.05)
                continue
            if record.state == CREATING:
                if not await self.instances.creator_alive(record):
                    await self._settle(record)
                    continue
                if time.monotonic() >= deadline:
                    raise Busy(f"the DM between {ghost_id} and {user_id} is still being created")
                await asyncio.sleep(0.05)
                continue
            if replace:
                assert record.room_id is not None
                if replaces is None or record.room_id == replaces:
                    fresh = await self._replace(network, remote_id, profile, record)
                    if fresh is not None:
                        return fresh
                    continue  # the DM changed meanwhile: look again
                # An earlier try of this request replaced that room already: keep this one.
                replace = False
            reason = _unusable_reason(record)
            if reason is None:
                await self.sync_profile(network, remote_id, profile, record.ghost_displayname,
                                        record.ghost_avatar_url)
                return OpenedDM(DM.of(record), created=False)
            assert record.room_id is not None
            if (reason == "user-left" and self.settings.on_leave == "reinvite"
                    and await self._reinvite(record)):
                return OpenedDM(DM.of(record), created=False)
            if not new_room:
                raise NoNewRoom
            log.info("DM room %s (%s / %s) is no longer usable: %s; opening a new one",
                     record.room_id, ghost_id, user_id, reason)
            await self.stores.dms.end(record.room_id, now_ms())

    async def _replace(self, network: Network, remote_id: str, profile: Profile,
                       old: DMRecord) -> OpenedDM | None:
        """The platform asked for a fresh DM: make one and end ``old``, the pair's active DM.

        Whatever can refuse the new room (the recipient check, the quota and the pace) is
        asked before ``old`` changes. ``old`` is ended and the pair claimed in one transaction,
        only if ``old`` is still the pair's active DM (None otherwise: the caller looks again);
        if no room comes of the claim, ``old`` is the DM again. Only once the new room exists
        is the platform told (``dm.ended``, ``replaced_by_platform``) and does the ghost leave.
        """
        assert old.room_id is not None
        await self._check_recipient_exists(old.user_id)
        await self.instances.ensure_present()
        claim = secrets.token_hex(8)
        try:
            async with contextlib.AsyncExitStack() as stack:
                stack.enter_context(default_budget(self.settings.rate_limits.request_wait))
                await stack.enter_async_context(self.pacing.new_room(network))
                async with self.stores.transaction() as conn:
                    if not await self.stores.dms.replace_with_claim(
                            conn, old.room_id, BEING_REPLACED, claim, self.instances.id,
                            now_ms()):
                        raise _Changed
                try:
                    opened = await self._create_paced(network, remote_id, old.ghost_id,
                                                      old.user_id, profile, claim)
                except BaseException:
                    if await self.stores.dms.restore_replaced(old.room_id, BEING_REPLACED,
                                                              old.reason, now_ms()):
                        log.info("DM room %s stays the DM of %s / %s: no new room was made",
                                 old.room_id, old.ghost_id, old.user_id)
                    raise
        except _Changed:
            return None  # the quota and the pace were given back on the way out
        log.info("DM room %s (%s / %s) replaced by %s at %s's request", old.room_id,
                 old.ghost_id, old.user_id, opened.dm.room_id, network.id)
        await self._finish_replacement(old)
        return OpenedDM(opened.dm, opened.created, old.room_id)

    async def _finish_replacement(self, old: DMRecord) -> None:
        """A new room replaced ``old``: the platform is told (once, whoever gets here first)
        and the ghost leaves."""
        assert old.room_id is not None
        async with self.stores.transaction() as conn:
            if await self.stores.dms.change_ended_reason(conn, old.room_id, BEING_REPLACED,
                                                         REPLACED_BY_PLATFORM, now_ms()):
                await move(self.stores, conn, dataclasses.replace(old, state=ENDED), ENDED,
                           REPLACED_BY_PLATFORM, None, now_ms(), payloads.DM_ENDED,
                           key=f"{payloads.DM_ENDED}:replaced:{old.room_id}")
        await self.leave_replaced(old)

    async def leave_replaced(self, record: DMRecord) -> bool:
        """The ghost leaves a room its DM was replaced from, with a reason the user's client
        shows, withdrawing the user's invite first if the homeserver says they never joined.
        The room stays with the user, history and all. False if the homeserver refused."""
        assert record.room_id is not None
        api = self.ghosts.intent(record.ghost_id).api
        room = Path.v3.rooms[record.room_id]
        try:
            member = await api.request(Method.GET, room.state["m.room.member"][record.user_id])
            if member.get("membership") == "invite":
                await api.request(Method.POST, room.kick, content={
                    "user_id": record.user_id, "reason": MOVED_REASON})
        except MNotFound:
            pass  # never a member
        except _HS_ERRORS as e:
            log.warning("replacing DM room %s: withdrawing the invite failed: %r",
                        record.room_id, e)
        try:
            await api.request(Method.POST, room.leave, content={"reason": MOVED_REASON})
        except _HS_ERRORS as e:
            # Nothing written there reaches the platform; the leave is tried again at start.
            log.warning("replacing DM room %s: leave failed: %r", record.room_id, e)
            return False
        return True

    async def finish_replacements(self) -> int:
        """Replacements a process left unfinished (run at start, after unfinished creations
        are settled): a DM whose new room was made is ended for the platform and left, one
        whose new room never came is the DM again. Then the ghost leaves each replaced room it
        is still in (the leave failed). How many rooms were finished or left."""
        done = 0
        for record in await self.stores.dms.ended_for(BEING_REPLACED):
            async with self._pair_locks.hold((record.ghost_id, record.user_id)):
                current = await self.stores.dms.get_current(record.ghost_id, record.user_id)
                if current is not None and current.state == CREATING:
                    continue  # still being made; its request finishes it
                assert record.room_id is not None
                if current is None:
                    if await self.stores.dms.restore_replaced(record.room_id, BEING_REPLACED,
                                                              None, now_ms()):
                        log.warning("DM room %s (%s / %s): its replacement never made a room;"
                                    " it is the DM again", record.room_id, record.ghost_id,
                                    record.user_id)
                        done += 1
                    continue
                await self._finish_replacement(record)
                done += 1
        for record in await self.stores.dms.ended_with_ghost_joined(REPLACED_BY_PLATFORM):
            done += await self.leave_replaced(record)
        return done

    # --- recovery ---------------------------------------------------------------------------

    async def _settle(self, record: DMRecord) -> None:
        """A claim whose process is gone: adopt the room it made, or free the pair."""
        log.warning("the creation of the DM %s / %s (claim %s) was left unfinished; asking the"
                    " homeserver what it made", record.ghost_id, record.user_id, record.claim)
        async with homeserver_errors("look for the DM room an unfinished creation made"):
            room_id = await self.recovery.settle(record)
        if room_id is not None:
            await self._list_in_m_direct(record.ghost_id, record.user_id, room_id)

    async def recover_unfinished(self) -> int:
        """Settle every claim whose process is gone (at start-up); how many were settled."""
        settled = 0
        for record in await self.stores.dms.unfinished():
            settled += await self.settle_if_gone(record.ghost_id, record.user_id, record.claim)
        return settled

    async def settle_if_gone(self, ghost_id: UserID, user_id: UserID,
                             claim: str | None = None) -> bool:
        """Settle the pair's claim (``claim``, if given) if its process is gone."""
        async with self._pair_locks.hold((ghost_id, user_id)):
            current = await self.stores.dms.get_current(ghost_id, user_id)
            if (current is None or current.state != CREATING
                    or claim not in (None, current.claim)
                    or await self.instances.creator_alive(current)):
                return False
            try:
                await self._settle(current)
            except HomeserverError as e:
                log.warning("%s; settled when the pair is next written to", e)
                return False
            return True

    # --- creation ---------------------------------------------------------------------------

    async def _create(
        self, network: Network, remote_id: str, ghost_id: UserID, user_id: UserID,
        profile: Profile, claim: str,
    ) -> OpenedDM:
        """Within the bridge's pace and the network's new-DM quota, checked before anything is
        asked of the homeserver (a refusal costs no request); the quota is given back if no
        room comes of it."""
        async with contextlib.AsyncExitStack() as stack:
            # Called in-process (not through the API), a creation still waits out rate limits
            # for less than dm.creation_timeout, so no other worker takes it for abandoned.
            stack.enter_context(default_budget(self.settings.rate_limits.request_wait))
            try:
                await stack.enter_async_context(self.pacing.new_room(network))
            except BaseException:
                await self.stores.dms.release(ghost_id, user_id, claim)
                raise
            return await self._create_paced(network, remote_id, ghost_id, user_id, profile,
                                            claim)
        raise AssertionError("unreachable")  # mypy: the stack does not swallow exceptions

    async def _create_paced(
        self, network: Network, remote_id: str, ghost_id: UserID, user_id: UserID,
        profile: Profile, claim: str,
    ) -> OpenedDM:
        try:
            async with homeserver_errors("create the DM room"):
                await self.ghosts.ensure_registered(network, remote_id)
                ghost = await self.stores.ghosts.get(ghost_id)
                await self.sync_profile(network, remote_id, profile,
                                        ghost.displayname if ghost else None,
                                        ghost.avatar_url if ghost else None)
        except BaseException:
            await self.stores.dms.release(ghost_id, user_id, claim)
            raise
        marker = Marker(ghost_id, user_id, network.id, remote_id, claim)
        room_id: RoomID | None = None
        try:
            room_id = await self._create_room(network, remote_id, marker)
            await self.stores.members.assume(room_id, ghost_id, "join")
            await self.stores.members.assume(room_id, user_id, "invite")
            await self.appservice.state_store.joined(room_id, ghost_id)
            await self.appservice.state_store.invited(room_id, user_id)
            activated = await self.stores.dms.activate(ghost_id, user_id, claim, room_id,
                                                       now_ms())
        except asyncio.CancelledError:
            # No time to ask the homeserver: the next request for the pair settles it at once.
            await asyncio.shield(self.stores.dms.abandon(ghost_id, user_id, claim))
            raise
        except Exception as e:
            await self._undo(marker, room_id)
            if _federation_denied(e):
                raise RecipientUnreachable(
                    f"{user_id} is on a server this homeserver does not federate with: {e}"
                ) from e
            if isinstance(e, MatrixRequestError):
                raise HomeserverError(f"the homeserver refused to create the DM room: {e}"
                                      ) from e
            if isinstance(e, (TimeoutError, MatrixConnectionError, aiohttp.ClientError)):
                raise HomeserverError("the homeserver could not be reached to create the DM"
                                      f" room: {e!r}") from e
            raise
        if not activated:
            log.error("DM room %s was created after its claim was settled by another; removing"
                      " it", room_id)
            await self.recovery.discard(ghost_id, user_id, room_id)
            raise Busy(f"the DM between {ghost_id} and {user_id} was being created twice")
        log.info("opened DM room %s between %s and %s", room_id, ghost_id, user_id)
        await self._list_in_m_direct(ghost_id, user_id, room_id)
        record = await self.stores.dms.get_by_room(room_id)
        assert record is not None
        return OpenedDM(DM.of(record), created=True)

    async def _undo(self, marker: Marker, room_id: RoomID | None) -> None:
        """A creation failed after ``createRoom`` was sent: remove whatever room it made.

        The room may exist even if ``createRoom`` failed (the invite failed after the room was
        made, or the answer was lost), and the homeserver's transaction may already have made
        it the pair's DM: it is found by its marker either way.
        """
        ghost_id, user_id = marker.ghost_id, marker.user_id
        try:
            rooms = {room_id} if room_id is not None else set()
            found = await self.recovery.marked_rooms(ghost_id, user_id, with_current=True)
            rooms |= {r for r, m in found if m.claim == marker.claim}
            for room in rooms:
                await self.stores.dms.end(room, now_ms())  # if a transaction recorded it
                await self.recovery.discard(ghost_id, user_id, room)
        except Exception:
            # The claim stays: the next request for the pair settles it from the homeserver.
            log.exception("could not clean up after the failed creation of the DM %s / %s",
                          ghost_id, user_id)
            await self.stores.dms.abandon(ghost_id, user_id, marker.claim)
            return
        await self.stores.dms.release(ghost_id, user_id, marker.claim)

    async def _create_room(self, network: Network, remote_id: str, marker: Marker) -> RoomID:
        ghost_id, user_id = marker.ghost_id, marker.user_id
        users = {user_id: 100}
        if await self._default_room_version() not in _CREATOR_POWER_VERSIONS:
            users[ghost_id] = 100
        initial_state = bridgeinfo.initial_state(network, remote_id, ghost_id,
                                                 self.settings.bot_user_id)
        initial_state.append(marker.state_event())
        encrypted = self.encryption is not None and self.encryption.encrypts_new_rooms
        if self.encryption is not None and encrypted:
            # The ghost's device exists before the user can write, so it can read them.
            await self.encryption.machine(ghost_id)
            initial_state.append({"type": "m.room.encryption", "state_key": "",
                                  "content": ENCRYPTION_CONTENT})
        room_id = await self.ghosts.intent(ghost_id).create_room(
            preset=RoomCreatePreset.PRIVATE,
            is_direct=True,
            invitees=[user_id],
            initial_state=initial_state,
            power_level_override={"users": users},
        )
        if encrypted:
            await self.stores.encrypted_rooms.record(None, room_id, ENCRYPTION_CONTENT, now_ms())
        return room_id

    async def _default_room_version(self) -> str:
        if self._room_version is None:
            caps = await self.appservice.intent.api.request(Method.GET, Path.v3.capabilities)
            version = caps.get("capabilities", {}).get("m.room_versions", {}).get("default", "")
            self._room_version = str(version)
        return self._room_version

    async def _reinvite(self, record: DMRecord) -> bool:
        """Invite a user who left back into the same room; False if the room refuses."""
        assert record.room_id is not None
        try:
            await self.ghosts.intent(record.ghost_id).invite_user(
                record.room_id, record.user_id, extra_content={"is_direct": True},
                ensure_joined=False,  # type: ignore[call-arg]  # taken by mautrix's wrapper
            )
        except MForbidden as e:
            log.info("could not re-invite %s to %s: %s", record.user_id, record.room_id, e)
            return False
        except _HS_ERRORS as e:
            raise HomeserverError(f"the homeserver refused to re-invite the user: {e}") from e
        if record.user_membership is None:
            await self.stores.members.assume(record.room_id, record.user_id, "invite")
        else:
            await self.stores.members.replace(
                record.room_id, record.user_id, record.user_membership, "invite"
            )
        log.info("re-invited %s to DM room %s", record.user_id, record.room_id)
        return True

    # --- m.direct ---------------------------------------------------------------------------

    async def _list_in_m_direct(self, ghost_id: UserID, user_id: UserID, room_id: RoomID
                                ) -> None:
        try:
            await self.add_to_m_direct(ghost_id, user_id, room_id)
        except _M_DIRECT_LATER as e:
            # The room works; m.direct is repaired by the ghost's next DM (it merges every room).
            log.error("could not list %s in the m.direct of %s: %r", room_id, ghost_id, e)

    async def add_to_m_direct(self, ghost_id: UserID, user_id: UserID, room_id: RoomID) -> None:
        """Read, merge, write the ghost's m.direct: other entries are never lost, whichever
        worker writes them (one writer per ghost at a time, across workers)."""
        async with self._direct_locks.hold(ghost_id):
            intent = self.ghosts.intent(ghost_id)
            try:
                current = dict(await intent.get_account_data(EventType.DIRECT))
            except MNotFound:
                current = {}
            merged: dict[str, Any] = {k: list(v) if isinstance(v, list) else v
                                      for k, v in current.items()}
            known = await self.stores.dms.active_rooms_of_ghost(ghost_id)
            known.setdefault(user_id, []).append(room_id)
            for uid, rooms in known.items():
                entry = merged.setdefault(uid, [])
                if isinstance(entry, list):
                    entry.extend(r for r in rooms if r not in entry)
            if merged != current:
                await intent.set_account_data(EventType.DIRECT, merged)

    # --- before a room is made --------------------------------------------------------------

    async def _check_recipient_exists(self, user_id: UserID) -> None:
        """Does the recipient exist, and can this homeserver reach them? Asked before a room
        exists, so an invite that cannot succeed leaves no room behind."""
        local = user_id.split(":", 1)[1] == self.settings.domain
        try:
            await self.appservice.intent.get_profile(user_id)
        except MatrixRequestError as e:
            # Synapse answers 404 with M_UNKNOWN ("No row found") for users that do not exist.
            if e.http_status == 404:
                where = "on this homeserver" if local else "on their homeserver"
                raise UnknownRecipient(f"{user_id} does not exist {where}") from None
            if _federation_denied(e):
                raise RecipientUnreachable(
                    f"{user_id} is on a server this homeserver does not federate with: {e.message}"
                ) from None
            if not local and e.http_status in (401, 403):
                return  # their server keeps profiles private; the invite may still work
            raise HomeserverError(f"the homeserver could not look up the recipient: {e!r}") from e
        except (TimeoutError, MatrixConnectionError, aiohttp.ClientError) as e:
            raise HomeserverError(f"the homeserver could not look up the recipient: {e!r}") from e

    async def sync_profile(
        self, network: Network, remote_id: str, profile: Profile, name: str | None,
        avatar: str | None,
    ) -> None:
        """The ghost's name and avatar as the platform last said; no request when unchanged.

        Callers check ``profile.avatar`` (``DMService._check_avatar``) before anything changes,
        so a refused avatar leaves no ghost, room or new name behind.
        """
        async with homeserver_errors("set the ghost's profile"):
            await self.ghosts.sync_displayname(network, remote_id, profile.name, name)
            if profile.avatar is not None and profile.avatar != avatar:
                await self.ghosts.set_avatar(network, remote_id, profile.avatar)
