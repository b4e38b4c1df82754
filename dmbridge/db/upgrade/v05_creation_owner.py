from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v5(conn: Connection, scheme: Scheme) -> None:
    # Which bridge process holds a 'creating' claim (random per process start): a claim whose
    # process is gone is recovered at once, from the marker the room carries, not timed out.
    await conn.execute("ALTER TABLE dm ADD COLUMN instance TEXT")


upgrade_table.register(upgrade_v5, description="The process that holds a DM creation claim")
