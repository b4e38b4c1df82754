from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v9(conn: Connection, scheme: Scheme) -> None:
    # The ended DMs of one reason (fresh DMs the bridge stopped in the middle of, looked for at
    # every start): searched among the ended rows by reason, not read among all ended rows,
    # which grow with every DM ever ended.
    await conn.execute("CREATE INDEX dm_ended_reason ON dm (reason) WHERE state = 'ended'")


upgrade_table.register(upgrade_v9, index=8, description="Index of ended DMs by reason")
