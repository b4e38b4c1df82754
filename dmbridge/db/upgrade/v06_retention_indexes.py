from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v6(conn: Connection, scheme: Scheme) -> None:
    # Retention deletes the oldest rows in small batches: each batch must find them through an
    # index on the row's time, never by reading the whole table.
    await conn.execute("CREATE INDEX sent_message_created ON sent_message (created_at)")
    await conn.execute("CREATE INDEX matrix_message_created ON matrix_message (created_at)")
    await conn.execute("CREATE INDEX dm_history_at ON dm_history (at)")
    await conn.execute("CREATE INDEX media_created ON media (created_at)")
    await conn.execute("CREATE INDEX processed_event_received ON processed_event (received_at)")
    # A ghost's current avatar is never pruned from media: looked up per candidate row.
    await conn.execute("CREATE INDEX ghost_avatar ON ghost (avatar_url)")


upgrade_table.register(upgrade_v6, description="Indexes for pruning old rows by their time")
