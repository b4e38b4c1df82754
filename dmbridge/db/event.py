from __future__ import annotations

from mautrix.types import EventID
from mautrix.util.async_db import Connection, Database


class ProcessedEventStore:
    """Event IDs already handled: homeserver transaction IDs restart, event IDs do not."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    async def claim(conn: Connection, event_id: EventID, at_ms: int) -> bool:
        """Mark the event processed; False if it already was."""
        inserted = await conn.fetchval(
            "INSERT INTO processed_event (event_id, received_at) VALUES ($1, $2)"
            " ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            event_id, at_ms,
        )
        return inserted is not None
