"""Every change of a DM's state, with why and which event caused it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection, Database


@dataclass(frozen=True)
class Transition:
    ghost_id: str
    user_id: str
    network: str
    remote_id: str
    room_id: str | None
    state: str
    reason: str
    event_id: str | None
    at: int


class HistoryStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    async def record(conn: Connection, t: Transition) -> None:
        await conn.execute(
            "INSERT INTO dm_history (ghost_id, user_id, network, remote_id, room_id, state,"
            " reason, event_id, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            t.ghost_id, t.user_id, t.network, t.remote_id, t.room_id, t.state, t.reason,
            t.event_id, t.at,
        )

    async def of_pair(self, ghost_id: str, user_id: str) -> list[Transition]:
        rows = await self.db.fetch(
            "SELECT ghost_id, user_id, network, remote_id, room_id, state, reason, event_id, at"
            " FROM dm_history WHERE ghost_id=$1 AND user_id=$2 ORDER BY id",
            ghost_id, user_id,
        )
        return [_transition(r) for r in rows]


def _transition(row: Any) -> Transition:
    return Transition(**{k: row[k] for k in Transition.__dataclass_fields__})
