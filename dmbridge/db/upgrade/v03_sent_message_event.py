from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v3(conn: Connection, scheme: Scheme) -> None:
    # Read receipts name Matrix events; the platform wants its own message ID back.
    await conn.execute("CREATE INDEX sent_message_event ON sent_message (event_id)")


upgrade_table.register(upgrade_v3, description="Look sent messages up by event ID")
