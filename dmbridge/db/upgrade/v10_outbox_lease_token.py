from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v10(conn: Connection, scheme: Scheme) -> None:
    # Who holds an item's delivery lease: a token new for every lease taken, so that a
    # deliverer changes only the rows whose lease it still holds (never a row leased since by
    # another worker, nor a new row that took a deleted row's id on SQLite).
    await conn.execute("ALTER TABLE outbox ADD COLUMN lease_token TEXT")


upgrade_table.register(upgrade_v10, index=9, description="Outbox lease holders")
