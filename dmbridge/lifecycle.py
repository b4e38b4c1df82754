"""How a DM follows what happens in its room: leaves, declines, strangers, and replies.

Everything here runs inside the transaction that records the homeserver's events, so a
transition, its history row and the notice owed to the platform commit together or not at all.
"""

from __future__ import annotations

import logging
from typing import Any

from mautrix.types import EventID, RoomID, UserID
from mautrix.util.async_db import Connection

from . import payloads
from .db import Stores, now_ms
from .db.dm import ACTIVE, CREATING, DECLINED, ENDED, JOINING, DMRecord
from .db.history import Transition
from .db.invite import GhostInvite
from .db.undelivered import ELSEWHERE, NOT_A_DM
from .effects import Effects
from .errors import NotFound
from .lru import LRU
from .marker import MARKER, Marker
from .networks import Network, Networks
from .outgoing import Outgoing, lane_of

log = logging.getLogger("dmbridge.lifecycle")

_MEMBERSHIPS = frozenset({"join", "invite", "leave", "ban", "knock"})
_MESSAGES = frozenset({"m.room.message", "m.sticker"})
_RELATED = frozenset({"m.reaction", "m.room.redaction"})
# Why a DM ended that the platform replaced with a new room (``new: true``): what the user
# writes there never reaches the platform, and never makes that room the DM again.
REPLACED_BY_PLATFORM = "replaced_by_platform"
# A DM ended for a new room that is being made (and the platform not told yet): if none comes
# of it, the DM is that room again.
BEING_REPLACED = "being_replaced"
# Rooms whose user is remembered as typing (to tell the platform each start and stop once).
TYPING_ROOMS_MAX = 10_000


class Lifecycle:
    def __init__(self, *, stores: Stores, networks: Networks, bot_user_id: str, on_leave: str,
                 encryption: str = "off") -> None:
        self.stores = stores
        self.encryption = encryption
        self.networks = networks
        self.bot_user_id = bot_user_id
        self.on_leave = on_leave
        self.outgoing = Outgoing(stores)
        # The rooms whose user the platform was last told is typing; a room leaves when it is
        # told the typing stopped. Stops the bridge never sees (a DM ended meanwhile) would
        # keep rooms for ever: past the cap the oldest go (its stop, if it comes, is not told).
        self._typing: LRU[str, None] = LRU(TYPING_ROOMS_MAX)

    async def apply(self, conn: Connection, raw: dict[str, Any], now: int, effects: Effects
                    ) -> None:
        """Apply one new event from the homeserver."""
        kind = raw.get("type")
        if kind == "m.room.member":
            await self._member(conn, raw, now, effects)
        elif kind in _MESSAGES or kind in _RELATED:
            await self._message(conn, raw, now, effects)
        elif kind == MARKER and "state_key" in raw:
            await self._marker(conn, raw, now)
        elif kind == "m.room.encrypted":  # still encrypted: the bridge could not decrypt it
            await self.undecryptable(conn, raw, now, effects)

    async def undecryptable(self, conn: Connection, raw: dict[str, Any], now: int,
                            effects: Effects, *, waited: bool = False) -> None:
        """A user's message the bridge cannot read. With encryption on, its key may still come
        (in a later transaction): it waits for it first (see :mod:`dmbridge.late_keys`), and
        only once ``waited`` are the platform and the user told."""
        room_id = str(raw["room_id"])
        dm = await self.stores.dms.by_room(conn, room_id)
        if dm is None or raw.get("sender") != dm.user_id or dm.state != ACTIVE:
            return
        if self.encryption != "off" and not waited:
            log.info("%s: encrypted message %s waits for its room key", room_id,
                     raw.get("event_id"))
            await self.stores.undecrypted.add(conn, raw, now)
            effects.waiting = True
            return
        reason = "encryption_off" if self.encryption == "off" else "keys_missing"
        log.warning("%s: encrypted message %s cannot be read by the bridge (%s); not delivered",
                    room_id, raw.get("event_id"), reason)
        payload = payloads.undecryptable(lane_of(dm), room_id, raw, reason, now)
        await effects.queue(self.stores, conn, dm, payload, payload["idempotency_key"], now)
        effects.undecryptable.append((dm.ghost_id, room_id, str(raw["event_id"])))

    async def apply_ephemeral(self, conn: Connection, edu: dict[str, Any], now: int,
                              effects: Effects) -> None:
        """Typing and read receipts of the DM's user, for the platform."""
        kind, room_id, content = edu.get("type"), str(edu["room_id"]), edu["content"]
        if kind not in ("m.typing", "m.receipt"):
            return
        dm = await self.stores.dms.in_room(conn, room_id)
        if dm is None or dm.state != ACTIVE:
            return
        lane = lane_of(dm)
        items: list[dict[str, Any]] = []
        if kind == "m.typing":
            user_ids = content.get("user_ids")
            is_typing = isinstance(user_ids, list) and dm.user_id in user_ids
            told = effects.typing_of(room_id)
            if (room_id in self._typing if told is None else told) != is_typing:
                effects.typing[room_id] = is_typing  # remembered once committed
                items.append(payloads.typing(lane, room_id, is_typing, now))
        else:
            for event_id, receipts in content.items():
                mine = (receipts.get("m.read") or {}).get(dm.user_id) if isinstance(
                    receipts, dict) else None
                if not isinstance(mine, dict):
                    continue
                sent = await self.stores.messages.by_event(conn, dm.network, dm.remote_id,
                                                           event_id)
                if sent is not None:
                    items.append(payloads.read(lane, room_id, event_id, sent[0],
                                               mine.get("ts"), now))
        for payload in items:
            await effects.queue(self.stores, conn, dm, payload, payload["idempotency_key"], now)

    def committed(self, effects: Effects) -> None:
        """A transaction committed: the typing it told the platform of is remembered."""
        for room_id, is_typing in effects.typing.items():
            if is_typing:
                self._typing[room_id] = None
            else:
                self._typing.pop(room_id, None)

    # --- memberships ------------------------------------------------------------------------

    async def _member(self, conn: Connection, raw: dict[str, Any], now: int, effects: Effects
                      ) -> None:
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
                effects.invites = True
                return
            if membership in ("leave", "ban"):
                await self.stores.invites.drop(conn, room_id, user_id)  # invite withdrawn

        dm = await self.stores.dms.by_room(conn, room_id)
        if dm is None or dm.state not in (ACTIVE, JOINING):
            return
        change = self._transition(dm, user_id, membership, previous, sender)
        if change is not None:
            state, reason, notice = change
            await move(self.stores, conn, dm, state, reason, event_id, now, notice,
                       effects=effects)

    def _transition(self, dm: DMRecord, user_id: str, membership: str, previous: str | None,
                    sender: str) -> tuple[str, str, str] | None:
        """What a membership change does to a current DM: (state, reason, notice), or None."""
        if user_id == dm.user_id:
            if membership == "leave" and previous == "invite" and sender == user_id:
                return DECLINED, "invite_rejected", payloads.DM_DECLINED
            if membership == "leave":
                # By default the room stays the DM and the next message re-invites the user.
                state = ENDED if self.on_leave == "new_room" else dm.state
                return state, "user_left", payloads.DM_USER_LEFT
            if membership == "ban":
                return ENDED, "user_banned", payloads.DM_ENDED
            return None
        if user_id == dm.ghost_id:
            if membership not in ("leave", "ban"):
                return None
            if sender == dm.user_id:
                reason = "ghost_banned" if membership == "ban" else "ghost_kicked"
                return DECLINED, reason, payloads.DM_DECLINED
            if sender == dm.ghost_id and dm.state == JOINING:
                return None  # the bridge refused the room itself, and records why
            return ENDED, "ghost_removed", payloads.DM_ENDED
        if membership == "join":
            return ENDED, "third_party_joined", payloads.DM_ENDED
        return None

    async def _marker(self, conn: Connection, raw: dict[str, Any], now: int) -> None:
        """A room the bridge created, as the homeserver tells it: made the pair's DM if its
        creation is still unfinished (the creator may have died before recording it).

        A marked room the database does not know, and that its creation cannot claim any more,
        is kept as an ended DM: what the user writes there still reaches the platform.
        """
        room_id = RoomID(str(raw["room_id"]))
        marker = Marker.read(raw.get("content"), raw.get("sender"), raw.get("state_key"))
        parsed = self.networks.parse_ghost(marker.ghost_id) if marker is not None else None
        if marker is None or parsed is None or (parsed[0].id, parsed[1]) != (
                marker.network, marker.remote_id):
            return
        if await self.stores.dms.by_room(conn, room_id) is not None:
            return  # the creator (or a recovery) recorded it already
        current = await self.stores.dms.current_in(conn, marker.ghost_id, marker.user_id)
        if (current is not None and current.state == CREATING and current.claim == marker.claim
                and await self.stores.dms.activate_in(conn, marker.ghost_id, marker.user_id,
                                                      marker.claim, room_id, now)):
            log.info("%s: the DM of %s / %s, recorded from the homeserver's transaction",
                     room_id, marker.ghost_id, marker.user_id)
            return
        if not await self.stores.dms.keep_ended(conn, marker.ghost_id, marker.user_id,
                                                marker.network, marker.remote_id, room_id,
                                                "superseded", now):
            return  # a recovery made it the pair's DM meanwhile
        log.warning("%s: a DM room of %s / %s that its creation no longer claims; kept as ended",
                    room_id, marker.ghost_id, marker.user_id)

    # --- messages ---------------------------------------------------------------------------

    async def _message(self, conn: Connection, raw: dict[str, Any], now: int, effects: Effects
                       ) -> None:
        """A Matrix user's message, edit, reaction or deletion in a DM, queued for the platform."""
        room_id, event_id = str(raw.get("room_id")), str(raw.get("event_id"))
        dm = await self.stores.dms.in_room(conn, room_id)
        if dm is None or raw.get("sender") != dm.user_id:
            return  # not a DM, or the ghost's own message coming back
        if dm.others_joined:
            log.info("%s: %s %s not delivered: the room has other members, not a DM",
                     room_id, raw.get("type"), event_id)
            await self._not_delivered(conn, dm, raw, NOT_A_DM, now, effects)
            return
        if dm.state in (ENDED, DECLINED):
            if (dm.ghost_membership != "join" or raw.get("type") not in _MESSAGES
                    or dm.reason in (REPLACED_BY_PLATFORM, BEING_REPLACED)):
                log.info("%s: %s %s not delivered: the room is no longer the DM", room_id,
                         raw.get("type"), event_id)
                await self._not_delivered(conn, dm, raw, ELSEWHERE, now, effects)
                return
            await self._reach_out(conn, dm, event_id, now, effects)
        payload, mapped = await self.outgoing.payload(conn, dm, raw, now)
        if payload is None:
            return
        if mapped is not None:
            await self.stores.matrix_messages.add(conn, mapped, now)
        item = await effects.queue(self.stores, conn, dm, payload, event_id, now)
        if item is not None:
            log.info("%s: %s %s from %s queued for %s user %s (outbox %d)", room_id,
                     payload["type"], event_id, dm.user_id, dm.network, dm.remote_id, item)

    async def _not_delivered(self, conn: Connection, dm: DMRecord, raw: dict[str, Any],
                             reason: str, now: int, effects: Effects) -> None:
        """The user's message will not reach the platform: the ghost tells them, when it is
        still in the room to do so (see :mod:`dmbridge.undelivered`). The reason holds for
        the whole room, so it is told once since the DM last changed, not at every message,
        and never about an edit."""
        if raw.get("type") not in _MESSAGES or dm.ghost_membership != "join":
            return
        content = raw.get("content")
        relates = content.get("m.relates_to") if isinstance(content, dict) else None
        if isinstance(relates, dict) and relates.get("rel_type") == "m.replace":
            return
        assert dm.room_id is not None
        if await self.stores.undelivered.add_for_room(conn, str(raw["event_id"]), dm.room_id,
                                                      dm.ghost_id, reason, dm.updated_at, now):
            effects.undelivered = True

    async def _reach_out(self, conn: Connection, dm: DMRecord, event_id: str, now: int,
                         effects: Effects) -> None:
        """The user wrote in an old DM: it becomes the pair's DM again, lifting any decline."""
        current = await self.stores.dms.current_in(conn, dm.ghost_id, dm.user_id)
        if current is not None and current.state == CREATING:
            return  # a new room is being opened right now; it will be the DM
        if current is not None and current.room_id != dm.room_id:
            await move(self.stores, conn, current, ENDED, "replaced", event_id, now, None)
        await move(self.stores, conn, dm, ACTIVE, "user_wrote", event_id, now, payloads.DM_STARTED,
                   effects=effects)

    # --- transitions ------------------------------------------------------------------------

    def _is_bridge(self, user_id: str) -> bool:
        return user_id == self.bot_user_id or self.networks.parse_ghost(user_id) is not None


async def move(stores: Stores, conn: Connection, dm: DMRecord, state: str, reason: str,
               event_id: str | None, now: int, notice: str | None, key: str | None = None,
               *, effects: Effects | None = None) -> None:
    """Record a DM's transition, and queue the notice the platform gets about it (under
    ``key``, when given; through ``effects`` when recording a homeserver transaction)."""
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
        payload = payloads.notice(lane_of(dm), notice, dm.room_id, state, reason, event_id, now,
                                  key)
        if effects is not None:
            await effects.queue(stores, conn, dm, payload, payload["idempotency_key"], now)
            return
        await stores.outbox.add(
            conn, network=dm.network, remote_id=dm.remote_id, user_id=dm.user_id, type=notice,
            key=payload["idempotency_key"], payload=payload, now=now,
        )


async def clear_declined(stores: Stores, network: Network, remote_id: str, user_id: str) -> None:
    """An admin lifts a decline; the pair's next message opens a new DM. Raises NotFound."""
    ghost_id = network.ghost_user_id(remote_id)
    conn: Connection
    async with stores.transaction() as conn:
        record = await stores.dms.current_in(conn, ghost_id, user_id)
        if record is None or record.state != DECLINED:
            raise NotFound(f"{user_id} has not declined DMs from {network.id} user {remote_id}")
        await move(stores, conn, record, ENDED, "cleared_by_admin", None, now_ms(),
                   payloads.DM_CLEARED)
    log.info("cleared the decline of %s for %s user %s", user_id, network.id, remote_id)
