from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v7(conn: Connection, scheme: Scheme) -> None:
    # Every look-up of DMs must search an index, never read the whole table (a million rows).
    # room_id's UNIQUE constraint has its own index already: dm_room only doubled its writes.
    await conn.execute("DROP INDEX dm_room")
    # A ghost's DMs in any state: its m.direct, its known rooms, a claim's activation, forget.
    await conn.execute("CREATE INDEX dm_ghost ON dm (ghost_id, user_id)")
    # Unfinished creations, at start-up. Only those: an index of every row's state would
    # tempt SQLite's planner (which has no statistics) away from the selective ones.
    await conn.execute(
        "CREATE INDEX dm_creating ON dm (ghost_id, user_id) WHERE state = 'creating'")
    # The metrics' count of DMs by state reads an index only, not the table. On SQLite an
    # index of an expression no other statement compares: one of the plain column would lure
    # its planner (which has no statistics) away from the selective indexes.
    if scheme == Scheme.SQLITE:
        await conn.execute("CREATE INDEX dm_state ON dm ((state || ''))")
    else:
        await conn.execute("CREATE INDEX dm_state ON dm (state)")
    # The oldest active DMs of a network, in the order the API lists them.
    await conn.execute(
        "CREATE INDEX dm_active_listing ON dm (network, created_at, room_id)"
        " WHERE state = 'active'")


upgrade_table.register(upgrade_v7, description="Indexes for every look-up of DMs")
