"""Rooms with encryption turned on, as their ``m.room.encryption`` state says."""

from __future__ import annotations

import json
from typing import Any

from mautrix.types import RoomID, UserID
from mautrix.util.async_db import Connection, Database

from ..lru import LRU

# Rooms whose answer (encrypted or not) is kept in memory. Encryption is never turned off, so
# an encrypted room's entry never goes stale; a room turned encrypted later is recorded through
# this store (from the homeserver's transaction), which updates its entry. Encryption is for
# one worker (README: "Encrypted DMs"), so no other process records rooms behind its back.
ROOMS_CACHED = 10_000


class EncryptedRoomStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._known: LRU[str, dict[str, Any] | None] = LRU(ROOMS_CACHED)

    async def record(self, conn: Connection | None, room_id: RoomID, content: dict[str, Any],
                     now: int) -> None:
        """Remember the room as encrypted; the first content recorded stays."""
        query = ("INSERT INTO encrypted_room (room_id, content, created_at) VALUES ($1, $2, $3)"
                 " ON CONFLICT (room_id) DO NOTHING")
        await (conn or self.db).execute(query, room_id, json.dumps(content), now)
        if self._known.get(room_id) is None:
            self._known[room_id] = content

    async def get(self, room_id: RoomID) -> dict[str, Any] | None:
        """The room's encryption content, or None if it is not encrypted."""
        if room_id in self._known:
            return self._known[room_id]
        raw = await self.db.fetchval("SELECT content FROM encrypted_room WHERE room_id = $1",
                                     room_id)
        content: dict[str, Any] | None = json.loads(raw) if raw is not None else None
        self._known[room_id] = content
        return content

    async def shared_with(self, user_id: UserID) -> list[RoomID]:
        """The encrypted DM rooms of a Matrix user."""
        rows = await self.db.fetch(
            "SELECT e.room_id FROM encrypted_room e JOIN dm ON dm.room_id = e.room_id"
            " WHERE dm.user_id = $1 AND dm.state <> 'ended'", user_id)
        return [RoomID(row["room_id"]) for row in rows]

    async def ghost_of(self, room_id: RoomID) -> str | None:
        """The ghost of the DM in this room (the newest, if the room was a DM more than once)."""
        value = await self.db.fetchval(
            "SELECT ghost_id FROM dm WHERE room_id = $1 ORDER BY updated_at DESC LIMIT 1",
            room_id)
        return str(value) if value is not None else None

    async def user_of(self, room_id: RoomID) -> str | None:
        """The Matrix user of the DM in this room."""
        value = await self.db.fetchval(
            "SELECT user_id FROM dm WHERE room_id = $1 ORDER BY updated_at DESC LIMIT 1",
            room_id)
        return str(value) if value is not None else None
