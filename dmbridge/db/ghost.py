from __future__ import annotations

from dataclasses import dataclass

from mautrix.types import UserID
from mautrix.util.async_db import Database

from . import dmcache
from .dmcache import DMCache


@dataclass
class Ghost:
    user_id: UserID
    network: str
    remote_id: str
    displayname: str | None
    registered: bool
    avatar_url: str | None = None


class GhostStore:
    """Ghosts' registrations and profiles (shown in their DMs' records: every write names the
    ghost to the :class:`DMCache`)."""

    def __init__(self, db: Database, cache: DMCache) -> None:
        self.db = db
        self.cache = cache

    async def get(self, user_id: UserID) -> Ghost | None:
        row = await self.db.fetchrow(
            "SELECT user_id, network, remote_id, displayname, registered, avatar_url FROM ghost"
            " WHERE user_id=$1",
            user_id,
        )
        return Ghost(**dict(row)) if row else None

    async def mark_registered(self, user_id: UserID, network: str, remote_id: str) -> None:
        # No conflict target: two workers inserting the same ghost at once may collide on
        # either unique key (user_id, or network and remote_id), and PostgreSQL only forgives
        # a collision on the target's.
        async with self.cache.writing(self.db) as conn:
            self.cache.changed(dmcache.ghost(user_id))
            await conn.execute(
                "INSERT INTO ghost (user_id, network, remote_id, registered)"
                " VALUES ($1, $2, $3, true) ON CONFLICT DO NOTHING",
                user_id, network, remote_id,
            )
            await conn.execute(
                "UPDATE ghost SET registered=true WHERE user_id=$1 AND NOT registered", user_id
            )

    async def set_displayname(self, user_id: UserID, displayname: str) -> None:
        async with self.cache.writing(self.db) as conn:
            self.cache.changed(dmcache.ghost(user_id))
            await conn.execute(
                "UPDATE ghost SET displayname=$2 WHERE user_id=$1", user_id, displayname
            )

    async def set_avatar(self, user_id: UserID, avatar_url: str) -> None:
        async with self.cache.writing(self.db) as conn:
            self.cache.changed(dmcache.ghost(user_id))
            await conn.execute(
                "UPDATE ghost SET avatar_url=$2 WHERE user_id=$1", user_id, avatar_url
            )
