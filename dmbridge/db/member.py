from __future__ import annotations

from mautrix.types import EventID, RoomID, UserID
from mautrix.util.async_db import Connection, Database


class MemberStore:
    """Room memberships as the homeserver's transactions report them."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    async def record(
        conn: Connection, room_id: RoomID, user_id: UserID, membership: str, event_id: EventID,
        displayname: str | None = None,
    ) -> str | None:
        """Store the membership; returns the one it replaces (None if it is the first)."""
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
        await self.db.execute(
            "INSERT INTO room_member (room_id, user_id, membership, displayname)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (room_id, user_id) DO NOTHING",
            room_id, user_id, membership, displayname,
        )

    async def replace(
        self, room_id: RoomID, user_id: UserID, expected: str | None, membership: str
    ) -> None:
        """Set a membership only if it is still what we saw (a newer event wins)."""
        await self.db.execute(
            "UPDATE room_member SET membership=$4, event_id=NULL"
            " WHERE room_id=$1 AND user_id=$2 AND membership=$3",
            room_id, user_id, expected, membership,
        )

    async def get(self, room_id: RoomID, user_id: UserID) -> str | None:
        value = await self.db.fetchval(
            "SELECT membership FROM room_member WHERE room_id=$1 AND user_id=$2", room_id, user_id
        )
        return str(value) if value is not None else None
