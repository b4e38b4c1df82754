from __future__ import annotations

from mautrix.types import EventID, RoomID, UserID
from mautrix.util.async_db import Connection, Database

from . import dmcache
from .dmcache import DMCache


class MemberStore:
    """Room memberships as the homeserver's transactions report them (a DM's record shows its
    room's members: every write names its room to the :class:`DMCache`)."""

    def __init__(self, db: Database, cache: DMCache) -> None:
        self.db = db
        self.cache = cache

    async def record(
        self, conn: Connection, room_id: RoomID, user_id: UserID, membership: str,
        event_id: EventID, displayname: str | None = None,
    ) -> str | None:
        """Store the membership; returns the one it replaces (None if it is the first)."""
        self.cache.changed(dmcache.room(room_id))
        previous = await conn.fetchval(
            "SELECT membership FROM room_member WHERE room_id=$1 AND user_id=$2",
            room_id, user_id,
        )
        await conn.execute(
            "INSERT INTO room_member (room_id, user_id, membership, event_id, displayname)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (room_id, user_id)"
            " DO UPDATE SET membership=excluded.membership, event_id=excluded.event_id,"
            " displayname=excluded.displayname",
            room_id, user_id, membership, event_id, displayname,
        )
        return str(previous) if previous is not None else None

    async def assume(
        self, room_id: RoomID, user_id: UserID, membership: str, displayname: str | None = None
    ) -> None:
        """Record what our own request just did, unless a transaction already told us more."""
        async with self.cache.writing(self.db) as conn:
            self.cache.changed(dmcache.room(room_id))
            await conn.execute(
                "INSERT INTO room_member (room_id, user_id, membership, displayname)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (room_id, user_id) DO NOTHING",
                room_id, user_id, membership, displayname,
            )

    async def replace(
        self, room_id: RoomID, user_id: UserID, expected: str | None, membership: str
    ) -> None:
        """Set a membership only if it is still what we saw (a newer event wins)."""
        async with self.cache.writing(self.db) as conn:
            self.cache.changed(dmcache.room(room_id))
            await conn.execute(
                "UPDATE room_member SET membership=$4, event_id=NULL"
                " WHERE room_id=$1 AND user_id=$2 AND membership=$3",
                room_id, user_id, expected, membership,
            )

    async def get(self, room_id: RoomID, user_id: UserID) -> str | None:
        value = await self.db.fetchval(
            "SELECT membership FROM room_member WHERE room_id=$1 AND user_id=$2", room_id, user_id
        )
        return str(value) if value is not None else None
