"""How a DM follows what happens in its room: leaves, declines, strangers, and replies.

Everything here runs inside the transaction that records the homeserver's events, so a
transition, its history row and the notice owed to the platform commit together or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mautrix.types import EventID, RoomID, UserID
from mautrix.util.async_db import Connection

from . import payloads
from .db import Stores
from .db.dm import ACTIVE, CREATING, DECLINED, ENDED, JOINING, DMRecord
from .db.history import Transition
from .db.invite import GhostInvite
from .networks import Networks

log = logging.getLogger("dmbridge.lifecycle")

_MEMBERSHIPS = frozenset({"join", "invite", "leave", "ban", "knock"})
_MESSAGES = frozenset({"m.room.message", "m.sticker"})


def lane_of(dm: DMRecord) -> payloads.Lane:
    return payloads.Lane(dm.network, dm.remote_id, dm.user_id, dm.ghost_id)


class Lifecycle:
    def __init__(self, *, stores: Stores, networks: Networks, bot_user_id: str, on_leave: str,
                 queued: Callable[[str], None], invited: Callable[[], None]) -> None:
        self.stores = stores
        self.networks = networks
        self.bot_user_id = bot_user_id
        self.on_leave = on_leave
        self._queued = queued
        self._invited = invited

    async def apply(self, conn: Connection, raw: dict[str, Any], now: int) -> None:
        """Apply one new event from the homeserver."""
        kind = raw.get("type")
        if kind == "m.room.member":
            await self._member(conn, raw, now)
        elif kind in _MESSAGES:
            await self._message(conn, raw, now)
        elif kind == "m.room.encrypted":
            dm = await self.stores.dms.by_room(conn, str(raw.get("room_id")))
            if dm is not None and raw.get("sender") == dm.user_id:
                log.warning("%s: encrypted message %s cannot be read by the bridge; not delivered",
                            raw.get("room_id"), raw.get("event_id"))

    # --- memberships ------------------------------------------------------------------------

    async def _member(self, conn: Connection, raw: dict[str, Any], now: int) -> None:
        content = raw.get("content")
        if not isinstance(content, dict) or content.get("membership") not in _MEMBERSHIPS:
            return
        membership = str(content["membership"])
        room_id, user_id = RoomID(raw["room_id"]), UserID(raw["state_key"])
        sender, event_id = str(raw.get("sender")), EventID(raw["event_id"])
        name = content.get("displayname")
        previous = await self.stores.members.record(
            conn, room_id, user_id, membership, event_id, name if isinstance(name, str) else None
        )
        if previous is None:
            unsigned = raw.get("unsigned") if isinstance(raw.get("unsigned"), dict) else {}
            prev_content = (unsigned or {}).get("prev_content")
            if isinstance(prev_content, dict):
                previous = prev_content.get("membership")
        log.info("%s: %s is now %s (was %s; by %s; %s)", room_id, user_id, membership, previous,
                 sender, event_id)

        if self.networks.parse_ghost(user_id) is not None:
            if membership == "invite" and not self._is_bridge(sender):
                await self.stores.invites.add(conn, GhostInvite(
                    room_id, user_id, sender, content.get("is_direct") is True, event_id, now,
                ))
                self._invited()
                return
            if membership in ("leave", "ban"):
                await self.stores.invites.drop(conn, room_id, user_id)  # invite withdrawn

        dm = await self.stores.dms.by_room(conn, room_id)
        if dm is None or dm.state not in (ACTIVE, JOINING):
            return
        if user_id == dm.user_id:
            if membership == "leave" and previous == "invite" and sender == user_id:
                await self._move(conn, dm, DECLINED, "invite_rejected", event_id, now,
                                 payloads.DM_DECLINED)
            elif membership == "leave":
                if self.on_leave == "new_room":
                    await self._move(conn, dm, ENDED, "user_left", event_id, now,
                                     payloads.DM_USER_LEFT)
                else:  # the room stays the DM; the next message re-invites the user
                    await self._move(conn, dm, dm.state, "user_left", event_id, now,
                                     payloads.DM_USER_LEFT)
            elif membership == "ban":
                await self._move(conn, dm, ENDED, "user_banned", event_id, now,
                                 payloads.DM_ENDED)
        elif user_id == dm.ghost_id:
            if membership not in ("leave", "ban"):
                return
            if sender == dm.user_id:
                reason = "ghost_banned" if membership == "ban" else "ghost_kicked"
                await self._move(conn, dm, DECLINED, reason, event_id, now, payloads.DM_DECLINED)
            else:
                await self._move(conn, dm, ENDED, "ghost_removed", event_id, now,
                                 payloads.DM_ENDED)
        elif membership == "join":
            await self._move(conn, dm, ENDED, "third_party_joined", event_id, now,
                             payloads.DM_ENDED)

    # --- messages ---------------------------------------------------------------------------

    async def _message(self, conn: Connection, raw: dict[str, Any], now: int) -> None:
        room_id, event_id = str(raw.get("room_id")), str(raw.get("event_id"))
        dm = await self.stores.dms.by_room(conn, room_id)
        if dm is None or raw.get("sender") != dm.user_id:
            return  # not a DM, or the ghost's own message coming back
        if dm.others_joined:
            log.info("%s: message %s not delivered: the room has other members, not a DM",
                     room_id, event_id)
            return
        if dm.state in (ENDED, DECLINED):
            if dm.ghost_membership != "join":
                log.info("%s: message %s not delivered: the ghost is not in the room",
                         room_id, event_id)
                return
            await self._reach_out(conn, dm, event_id, now)
        item = await self.stores.outbox.add(
            conn, network=dm.network, remote_id=dm.remote_id, user_id=dm.user_id,
            type=payloads.MESSAGE, key=event_id, now=now,
            payload=payloads.message(lane_of(dm), room_id, raw, dm.user_displayname, now),
        )
        if item is not None:
            log.info("%s: message %s from %s queued for %s user %s (outbox %d)", room_id,
                     event_id, dm.user_id, dm.network, dm.remote_id, item)
            self._queued(dm.network)

    async def _reach_out(self, conn: Connection, dm: DMRecord, event_id: str, now: int) -> None:
        """The user wrote in an old DM: it becomes the pair's DM again, lifting any decline."""
        current = await self.stores.dms.current_in(conn, dm.ghost_id, dm.user_id)
        if current is not None and current.state == CREATING:
            return  # a new room is being opened right now; it will be the DM
        if current is not None:
            await self._move(conn, current, ENDED, "replaced", event_id, now, None)
        await self._move(conn, dm, ACTIVE, "user_wrote", event_id, now, payloads.DM_STARTED)

    # --- transitions ------------------------------------------------------------------------

    async def _move(self, conn: Connection, dm: DMRecord, state: str, reason: str,
                    event_id: str | None, now: int, notice: str | None) -> None:
        await move(self.stores, conn, dm, state, reason, event_id, now, notice)
        if notice is not None:
            self._queued(dm.network)

    def _is_bridge(self, user_id: str) -> bool:
        return user_id == self.bot_user_id or self.networks.parse_ghost(user_id) is not None


async def move(stores: Stores, conn: Connection, dm: DMRecord, state: str, reason: str,
               event_id: str | None, now: int, notice: str | None) -> None:
    """Record a DM's transition, and queue the notice the platform gets about it."""
    assert dm.room_id is not None
    if state != dm.state:
        await stores.dms.set_state(conn, dm.room_id, state, reason, now)
    await stores.history.record(conn, Transition(
        dm.ghost_id, dm.user_id, dm.network, dm.remote_id, dm.room_id, state, reason,
        event_id, now,
    ))
    log.info("DM %s (%s / %s): %s -> %s (%s)", dm.room_id, dm.ghost_id, dm.user_id, dm.state,
             state, reason)
    if notice is not None:
        payload = payloads.notice(lane_of(dm), notice, dm.room_id, state, reason, event_id, now)
        await stores.outbox.add(
            conn, network=dm.network, remote_id=dm.remote_id, user_id=dm.user_id, type=notice,
            key=payload["idempotency_key"], payload=payload, now=now,
        )
