from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v1(conn: Connection, scheme: Scheme) -> None:
    await conn.execute("""
        CREATE TABLE ghost (
            user_id      TEXT PRIMARY KEY,
            network      TEXT NOT NULL,
            remote_id    TEXT NOT NULL,
            displayname  TEXT,
            registered   BOOLEAN NOT NULL DEFAULT false,
            UNIQUE (network, remote_id)
        )
    """)
    # state: 'creating' (claimed by one request, room not made yet), 'active', 'ended'.
    # At most one non-ended DM per pair, across every worker sharing the database.
    await conn.execute("""
        CREATE TABLE dm (
            ghost_id    TEXT NOT NULL,
            user_id     TEXT NOT NULL,
            network     TEXT NOT NULL,
            remote_id   TEXT NOT NULL,
            room_id     TEXT UNIQUE,
            state       TEXT NOT NULL,
            claim       TEXT,
            created_at  BIGINT NOT NULL,
            updated_at  BIGINT NOT NULL
        )
    """)
    await conn.execute(
        "CREATE UNIQUE INDEX dm_current_pair ON dm (ghost_id, user_id) WHERE state <> 'ended'"
    )
    await conn.execute("CREATE INDEX dm_user ON dm (user_id)")
    await conn.execute("""
        CREATE TABLE room_member (
            room_id     TEXT NOT NULL,
            user_id     TEXT NOT NULL,
            membership  TEXT NOT NULL,
            event_id    TEXT,
            PRIMARY KEY (room_id, user_id)
        )
    """)
    await conn.execute("""
        CREATE TABLE sent_message (
            network     TEXT NOT NULL,
            remote_id   TEXT NOT NULL,
            message_id  TEXT NOT NULL,
            room_id     TEXT NOT NULL,
            event_id    TEXT NOT NULL,
            created_at  BIGINT NOT NULL,
            PRIMARY KEY (network, remote_id, message_id)
        )
    """)
    await conn.execute("""
        CREATE TABLE processed_event (
            event_id     TEXT PRIMARY KEY,
            received_at  BIGINT NOT NULL
        )
    """)


upgrade_table.register(
    upgrade_v1, description="Ghosts, DMs, memberships, sent messages, processed events"
)
