"""PostgreSQL connections that go back to the pool without a reset round trip.

asyncpg resets a connection each time it returns to the pool (``pg_advisory_unlock_all();
CLOSE ALL; UNLISTEN *; RESET ALL``): one more server round trip per statement run on the
pool, as many as the statements themselves on the hot path. The bridge leaves no session state
behind for that to clear: it sets no settings, opens no cursors, listens on no pooled
connection, and releases its one session advisory lock itself (:mod:`dmbridge.retention`).
An open transaction is still rolled back on release, by asyncpg, whatever the reset query.
"""

from __future__ import annotations

import asyncpg


class UnresetConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection released as it is, without asyncpg's session reset."""

    def get_reset_query(self) -> str:
        return ""
