from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v11(conn: Connection, scheme: Scheme) -> None:
    # The rooms with encryption turned on (their m.room.encryption content): what is sent there
    # is encrypted by the sending ghost's device. Encryption is never turned off again.
    await conn.execute("""
        CREATE TABLE encrypted_room (
            room_id     TEXT PRIMARY KEY,
            content     TEXT NOT NULL,
            created_at  BIGINT NOT NULL
        )
    """)


upgrade_table.register(upgrade_v11, index=10, description="Rooms with encryption turned on")
