from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v2(conn: Connection, scheme: Scheme) -> None:
    # dm.state gains 'declined' (the user turned the contact down; the row keeps the pair's slot
    # so nothing new is opened) and 'joining' (the user invited the ghost; it is joining).
    await conn.execute("ALTER TABLE dm ADD COLUMN reason TEXT")
    await conn.execute("CREATE INDEX dm_room ON dm (room_id)")
    await conn.execute("ALTER TABLE room_member ADD COLUMN displayname TEXT")
    # Ids only ever grow (AUTOINCREMENT on SQLite): the pull API's cursor relies on it.
    serial = (
        "INTEGER PRIMARY KEY AUTOINCREMENT" if scheme == Scheme.SQLITE else "BIGSERIAL PRIMARY KEY"
    )
    await conn.execute(f"""
        CREATE TABLE dm_history (
            id          {serial},
            ghost_id    TEXT NOT NULL,
            user_id     TEXT NOT NULL,
            network     TEXT NOT NULL,
            remote_id   TEXT NOT NULL,
            room_id     TEXT,
            state       TEXT NOT NULL,
            reason      TEXT NOT NULL,
            event_id    TEXT,
            at          BIGINT NOT NULL
        )
    """)
    await conn.execute("CREATE INDEX dm_history_pair ON dm_history (ghost_id, user_id, id)")
    # Everything owed to a platform: Matrix users' messages and DM lifecycle notices.
    # state: 'pending' -> 'delivered' | 'dead'. Within one lane (network, remote_id, user_id)
    # items go out strictly in id order.
    await conn.execute(f"""
        CREATE TABLE outbox (
            id               {serial},
            network          TEXT NOT NULL,
            remote_id        TEXT NOT NULL,
            user_id          TEXT NOT NULL,
            type             TEXT NOT NULL,
            idempotency_key  TEXT NOT NULL UNIQUE,
            payload          TEXT NOT NULL,
            state            TEXT NOT NULL,
            attempts         INTEGER NOT NULL DEFAULT 0,
            next_attempt_at  BIGINT NOT NULL,
            lease_until      BIGINT,
            pulled_at        BIGINT,
            last_error       TEXT,
            created_at       BIGINT NOT NULL,
            queued_at        BIGINT NOT NULL,
            finished_at      BIGINT
        )
    """)
    await conn.execute(
        "CREATE INDEX outbox_lane ON outbox (state, network, remote_id, user_id, id)"
    )
    await conn.execute("CREATE INDEX outbox_finished ON outbox (state, finished_at)")
    # Invites of ghosts by Matrix users, kept until answered (joined or refused).
    await conn.execute("""
        CREATE TABLE ghost_invite (
            room_id      TEXT NOT NULL,
            ghost_id     TEXT NOT NULL,
            inviter      TEXT NOT NULL,
            is_direct    BOOLEAN NOT NULL,
            event_id     TEXT NOT NULL,
            received_at  BIGINT NOT NULL,
            PRIMARY KEY (room_id, ghost_id)
        )
    """)


upgrade_table.register(
    upgrade_v2, description="Outbox, DM history, declined DMs, ghost invites, member names"
)
