from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v8(conn: Connection, scheme: Scheme) -> None:
    # Every worker sees every recorded invite: one answers it, under a lease that runs out if
    # its process dies, so another takes the invite over.
    await conn.execute("ALTER TABLE ghost_invite ADD COLUMN lease_until BIGINT")
    await conn.execute("ALTER TABLE ghost_invite ADD COLUMN leased_by TEXT")


# Version 8 whatever the number of migrations before it: version 7 is the index migration.
upgrade_table.register(upgrade_v8, index=7, description="Leases on invites of ghosts")
