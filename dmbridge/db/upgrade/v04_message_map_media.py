from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v4(conn: Connection, scheme: Scheme) -> None:
    # What a platform sent: plain messages, edits and reactions share the sender's ID space.
    # target_event_id is what an edit or reaction relates to; redacted_at marks a deletion.
    await conn.execute("ALTER TABLE sent_message ADD COLUMN kind TEXT NOT NULL DEFAULT 'message'")
    await conn.execute("ALTER TABLE sent_message ADD COLUMN target_event_id TEXT")
    await conn.execute("ALTER TABLE sent_message ADD COLUMN redacted_at BIGINT")
    # "Who sent this ID?": a refused edit or deletion is told whose message it is.
    await conn.execute("CREATE INDEX sent_message_by_id ON sent_message (network, message_id)")
    # What a Matrix user sent that a platform was given, so the platform can point back at it.
    await conn.execute("""
        CREATE TABLE matrix_message (
            event_id         TEXT PRIMARY KEY,
            room_id          TEXT NOT NULL,
            network          TEXT NOT NULL,
            remote_id        TEXT NOT NULL,
            user_id          TEXT NOT NULL,
            kind             TEXT NOT NULL,
            target_event_id  TEXT,
            reaction_key     TEXT,
            created_at       BIGINT NOT NULL,
            redacted_at      BIGINT
        )
    """)
    await conn.execute(
        "CREATE INDEX matrix_message_dm ON matrix_message (network, remote_id, user_id)"
    )
    # Media a platform uploaded through the bridge; only these may be sent or used as avatars.
    await conn.execute("""
        CREATE TABLE media (
            content_uri  TEXT PRIMARY KEY,
            network      TEXT NOT NULL,
            mimetype     TEXT NOT NULL,
            size         BIGINT NOT NULL,
            filename     TEXT,
            width        INTEGER,
            height       INTEGER,
            created_at   BIGINT NOT NULL
        )
    """)
    await conn.execute("ALTER TABLE ghost ADD COLUMN avatar_url TEXT")


upgrade_table.register(
    upgrade_v4, description="Message map both ways (edits, reactions, deletions), uploaded media,"
    " ghost avatars",
)
