"""Invites of ghosts by Matrix users, kept until the ghost has joined or refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection, Database, Scheme


@dataclass(frozen=True)
class GhostInvite:
    room_id: str
    ghost_id: str
    inviter: str
    is_direct: bool
    event_id: str
    received_at: int


class InviteStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    async def add(conn: Connection, invite: GhostInvite) -> None:
        await conn.execute(
            "INSERT INTO ghost_invite (room_id, ghost_id, inviter, is_direct, event_id,"
            " received_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (room_id, ghost_id)"
            " DO UPDATE SET inviter=excluded.inviter, is_direct=excluded.is_direct,"
            " event_id=excluded.event_id, received_at=excluded.received_at",
            invite.room_id, invite.ghost_id, invite.inviter, invite.is_direct, invite.event_id,
            invite.received_at,
        )

    @staticmethod
    async def drop(conn: Connection, room_id: str, ghost_id: str) -> None:
        await conn.execute(
            "DELETE FROM ghost_invite WHERE room_id=$1 AND ghost_id=$2", room_id, ghost_id
        )

    async def done(self, invite: GhostInvite) -> None:
        """Forget an invite once answered, unless a newer invite replaced it meanwhile."""
        await self.db.execute(
            "DELETE FROM ghost_invite WHERE room_id=$1 AND ghost_id=$2 AND event_id=$3",
            invite.room_id, invite.ghost_id, invite.event_id,
        )

    async def all(self) -> list[GhostInvite]:
        rows = await self.db.fetch(
            "SELECT room_id, ghost_id, inviter, is_direct, event_id, received_at"
            " FROM ghost_invite ORDER BY received_at"
        )
        return [_invite(r) for r in rows]

    def _now(self) -> str:
        """Milliseconds since the epoch on the database's clock: one clock for every worker,
        whatever the clocks of their hosts say."""
        if self.db.scheme in (Scheme.POSTGRES, Scheme.COCKROACH):
            return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
        return "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"

    async def unleased(self) -> list[GhostInvite]:
        """The invites no worker is answering now (or whose worker's lease ran out)."""
        rows = await self.db.fetch(
            "SELECT room_id, ghost_id, inviter, is_direct, event_id, received_at"
            f" FROM ghost_invite WHERE lease_until IS NULL OR lease_until < {self._now()}"
            " ORDER BY received_at",
        )
        return [_invite(r) for r in rows]

    async def lease(self, invite: GhostInvite, owner: str, lease_ms: int) -> bool:
        """Take the invite for ``owner`` for ``lease_ms``; False if another worker holds it, or
        if it is no longer this invite (answered, and the user invited the ghost again)."""
        now = self._now()
        got = await self.db.fetchval(
            f"UPDATE ghost_invite SET lease_until={now} + $4, leased_by=$3"
            " WHERE room_id=$1 AND ghost_id=$2 AND event_id=$5"
            f" AND (lease_until IS NULL OR lease_until < {now}) RETURNING room_id",
            invite.room_id, invite.ghost_id, owner, lease_ms, invite.event_id,
        )
        return got is not None

    async def renew(self, invite: GhostInvite, owner: str, lease_ms: int) -> bool:
        """Extend ``owner``'s lease to ``lease_ms`` from now; False if it is no longer held."""
        got = await self.db.fetchval(
            f"UPDATE ghost_invite SET lease_until={self._now()} + $4"
            " WHERE room_id=$1 AND ghost_id=$2 AND leased_by=$3 RETURNING room_id",
            invite.room_id, invite.ghost_id, owner, lease_ms,
        )
        return got is not None

    async def release(self, invite: GhostInvite, owner: str) -> None:
        """Let the invite go (answered or not): a newer invite, or a retry, is taken up next."""
        await self.db.execute(
            "UPDATE ghost_invite SET lease_until=NULL, leased_by=NULL"
            " WHERE room_id=$1 AND ghost_id=$2 AND leased_by=$3",
            invite.room_id, invite.ghost_id, owner,
        )

    async def release_others(self, owner: str) -> int:
        """Let go of every lease not ``owner``'s; for the only process on the database (SQLite),
        whose other owners are processes that have ended. How many were let go."""
        rows = await self.db.fetch(
            "UPDATE ghost_invite SET lease_until=NULL, leased_by=NULL"
            " WHERE leased_by IS NOT NULL AND leased_by <> $1 RETURNING room_id",
            owner,
        )
        return len(rows)


def _invite(row: Any) -> GhostInvite:
    fields = {k: row[k] for k in GhostInvite.__dataclass_fields__}
    return GhostInvite(**{**fields, "is_direct": bool(fields["is_direct"])})
