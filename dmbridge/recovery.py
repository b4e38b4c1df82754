"""Finding the rooms a DM creation made, from the homeserver: after a crash, or a failure.

A room the bridge creates carries its :class:`~dmbridge.marker.Marker` from the start. When a
creation's outcome is unknown (its process died, or ``createRoom`` failed after the homeserver
may have made the room), the ghost's joined rooms that the database does not know are read for
the marker: the claim's own room is adopted (or, after a failure, removed), and a creation that
never reached the homeserver frees the pair at once.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from mautrix.api import Method, Path
from mautrix.errors import MatrixConnectionError, MatrixRequestError, MForbidden, MNotFound
from mautrix.types import RoomID, UserID
from mautrix.util.async_db import Connection

from .db import Stores, now_ms
from .db.dm import DMRecord
from .ghosts import Ghosts
from .marker import MARKER, MARKER_STATE_KEY, Marker

log = logging.getLogger("dmbridge.recovery")

DISCARD_REASON = "This conversation could not be opened; it is closed."


class Recovery:
    def __init__(self, *, stores: Stores, ghosts: Ghosts) -> None:
        self.stores = stores
        self.ghosts = ghosts

    async def marked_rooms(self, ghost_id: UserID, user_id: UserID,
                           with_current: bool = False) -> list[tuple[RoomID, Marker]]:
        """Rooms the ghost is in, unknown to the database, marked for the pair; with
        ``with_current``, the pair's current room too (a transaction may have recorded it).

        Raises the homeserver's errors: an unanswered question must not free a pair.
        """
        intent = self.ghosts.intent(ghost_id)
        try:
            joined = await intent.get_joined_rooms()
        except MForbidden:  # the ghost was never registered: it made no room
            return []
        known = await self.stores.dms.rooms_of_ghost(ghost_id)
        if with_current:  # read after the known rooms, so a room recorded meanwhile is seen
            current = await self.stores.dms.get_current(ghost_id, user_id)
            if current is not None and current.room_id is not None:
                known.discard(current.room_id)
        found = []
        for room_id in joined:
            if room_id in known:
                continue
            marker = await self._marker(room_id, ghost_id, user_id)
            if marker is not None:
                found.append((room_id, marker))
        return found

    async def _marker(self, room_id: RoomID, ghost_id: UserID, user_id: UserID
                      ) -> Marker | None:
        try:
            event = await self.ghosts.intent(ghost_id).api.request(
                Method.GET, Path.v3.rooms[room_id].state[MARKER][MARKER_STATE_KEY],
                query_params={"format": "event"},
            )
        except (MNotFound, MForbidden):
            return None
        # With format=event the whole event, so its sender shows; a plain answer is the content.
        content = event.get("content", event) if "sender" in event else event
        sender = event.get("sender", ghost_id)
        marker = Marker.read(content, sender, MARKER_STATE_KEY)
        if marker is None or (marker.ghost_id, marker.user_id) != (ghost_id, user_id):
            return None
        return marker

    async def settle(self, record: DMRecord) -> RoomID | None:
        """Recover a claim whose process is gone: adopt the room it made, or free the pair.

        Returns the adopted room. Rooms marked by older claims of the pair (a creation that
        raced its own recovery) are recorded as ended DMs: what the user writes there reaches
        the platform and makes that room the DM again.
        """
        assert record.claim is not None
        found = await self.marked_rooms(record.ghost_id, record.user_id)
        for room_id, marker in found:
            if marker.claim != record.claim:
                await self._record_ended(record, room_id)
        mine = [room_id for room_id, marker in found if marker.claim == record.claim]
        if not mine:
            await self.stores.dms.release(record.ghost_id, record.user_id, record.claim)
            log.warning("DM creation for %s / %s never reached the homeserver; the pair is free",
                        record.ghost_id, record.user_id)
            return None
        room_id = mine[0]
        await self.stores.members.assume(room_id, record.ghost_id, "join")
        membership = await self._membership(room_id, record.ghost_id, record.user_id)
        if membership is not None:
            await self.stores.members.assume(room_id, record.user_id, membership)
        if not await self.stores.dms.activate(record.ghost_id, record.user_id, record.claim,
                                              room_id, now_ms()):
            return None  # someone else settled it first
        log.warning("recovered DM room %s of %s / %s from an unfinished creation (user: %s)",
                    room_id, record.ghost_id, record.user_id, membership)
        return room_id

    async def _membership(self, room_id: RoomID, ghost_id: UserID, user_id: UserID
                          ) -> str | None:
        try:
            content = await self.ghosts.intent(ghost_id).api.request(
                Method.GET, Path.v3.rooms[room_id].state["m.room.member"][user_id])
        except (MNotFound, MForbidden):
            return None
        membership = content.get("membership")
        return membership if isinstance(membership, str) else None

    async def _record_ended(self, record: DMRecord, room_id: RoomID) -> None:
        conn: Connection
        async with self.stores.transaction() as conn:
            if not await self.stores.dms.keep_ended(conn, record.ghost_id, record.user_id,
                                                    record.network, record.remote_id, room_id,
                                                    "superseded", now_ms()):
                return  # a transaction recorded it meanwhile
        log.warning("DM room %s of %s / %s was made by an earlier creation; kept as ended",
                    room_id, record.ghost_id, record.user_id)

    async def discard(self, ghost_id: UserID, user_id: UserID, room_id: RoomID) -> None:
        """Undo a room: withdraw the user's invite, then the ghost leaves and forgets it.

        Best effort: each step is tried whatever the previous one answered.
        """
        api = self.ghosts.intent(ghost_id).api
        steps: list[tuple[str, Any, dict[str, Any]]] = [
            ("kick", Path.v3.rooms[room_id].kick,
             {"user_id": user_id, "reason": DISCARD_REASON}),
            ("leave", Path.v3.rooms[room_id].leave, {"reason": DISCARD_REASON}),
            ("forget", Path.v3.rooms[room_id].forget, {}),
        ]
        for name, path, content in steps:
            try:
                await api.request(Method.POST, path, content=content)
            except MatrixRequestError as e:
                log.info("discarding %s: %s answered %s", room_id, name, e)
            except (TimeoutError, MatrixConnectionError, aiohttp.ClientError) as e:
                log.warning("discarding %s: %s failed: %r", room_id, name, e)
        log.info("%s left and forgot the DM room %s it could not finish", ghost_id, room_id)
