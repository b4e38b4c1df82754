"""The users' encrypted messages waiting for their room key (see :mod:`dmbridge.late_keys`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection, Database


@dataclass(frozen=True)
class Undecrypted:
    event: dict[str, Any]  # as the homeserver sent it, still encrypted
    received_at: int  # ms


class UndecryptedStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, conn: Connection, event: dict[str, Any], now: int) -> None:
        await conn.execute(
            "INSERT INTO undecrypted_event (event_id, room_id, event, received_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING",
            str(event["event_id"]), str(event["room_id"]), json.dumps(event), now)

    async def oldest(self, limit: int) -> list[Undecrypted]:
        rows = await self.db.fetch(
            "SELECT event, received_at FROM undecrypted_event ORDER BY received_at, event_id"
            " LIMIT $1", limit)
        return [Undecrypted(json.loads(row["event"]), int(row["received_at"])) for row in rows]

    async def take(self, conn: Connection, event_id: str) -> bool:
        """Remove the event's row; False if it was not waiting (any more)."""
        if await conn.fetchval("SELECT 1 FROM undecrypted_event WHERE event_id = $1",
                               event_id) is None:
            return False
        await conn.execute("DELETE FROM undecrypted_event WHERE event_id = $1", event_id)
        return True
