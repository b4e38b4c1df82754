from __future__ import annotations

from mautrix.types import EventID
from mautrix.util.async_db import Connection, Database

from .dmcache import DMCache
from .sqlite import SMALL_WRITE

_CLAIM = (
    SMALL_WRITE + "INSERT INTO processed_event (event_id, received_at) VALUES ($1, $2)"
    " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)


class ProcessedEventStore:
    """Event IDs already handled: homeserver transaction IDs restart, event IDs do not."""

    def __init__(self, db: Database, cache: DMCache | None = None) -> None:
        self.db = db
        self.cache = cache if cache is not None and cache.enabled else None

    async def claim(self, conn: Connection, event_id: EventID, at_ms: int) -> bool:
        """Mark the event processed; False if it already was.

        With the DM cache (SQLite), the claim also reads ``data_version``: being a write, it
        settles the cache for the rest of its transaction (see :meth:`DMCache.settled`).
        """
        if self.cache is None:
            return await conn.fetchval(_CLAIM, event_id, at_ms) is not None
        row = await conn.fetchrow(
            _CLAIM + ", (SELECT data_version FROM pragma_data_version) AS data_version",
            event_id, at_ms,
        )
        if row is None:
            return False
        self.cache.settled(int(row["data_version"]))
        return True
