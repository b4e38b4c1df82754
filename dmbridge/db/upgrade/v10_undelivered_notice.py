from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v10(conn: Connection, scheme: Scheme) -> None:
    # What the Matrix user is told about a message of theirs that did not reach the platform,
    # one row per such event: a resent transaction, a restart or a second worker never tells
    # them twice. ``told`` is what the room should say ('failed', or 'delivered' once a retried
    # dead letter got through), ``shown`` what it says now (NULL: nothing yet). ``due_at`` is
    # when the next attempt at showing it is due; NULL once the room says it (or it was given
    # up), so settled rows, kept for days, are never in the way of the ones to send.
    await conn.execute("""
        CREATE TABLE undelivered_notice (
            event_id         TEXT PRIMARY KEY,
            room_id          TEXT NOT NULL,
            ghost_id         TEXT NOT NULL,
            reason           TEXT NOT NULL,
            told             TEXT NOT NULL,
            shown            TEXT,
            notice_event_id  TEXT,
            attempts         INTEGER NOT NULL DEFAULT 0,
            lease_until      BIGINT,
            due_at           BIGINT,
            created_at       BIGINT NOT NULL,
            updated_at       BIGINT NOT NULL
        )
    """)
    # Those to show now, in the order they became due.
    await conn.execute("CREATE INDEX undelivered_notice_due ON undelivered_notice (due_at)")
    # Old ones to prune.
    await conn.execute("CREATE INDEX undelivered_notice_updated ON undelivered_notice"
                       " (updated_at)")
    # A room that stopped being a DM is told so once, not at every message; forgetting a
    # user's DMs forgets them by room.
    await conn.execute("CREATE INDEX undelivered_notice_room ON undelivered_notice"
                       " (room_id, reason, created_at)")


upgrade_table.register(upgrade_v10, index=9,
                       description="Notices to Matrix users about undelivered messages")
