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
    # The users' encrypted messages whose room key has not come yet (it may come in a later
    # transaction): tried again when keys come, told as undecryptable after a bounded wait.
    await conn.execute("""
        CREATE TABLE undecrypted_event (
            event_id     TEXT PRIMARY KEY,
            room_id      TEXT NOT NULL,
            event        TEXT NOT NULL,
            received_at  BIGINT NOT NULL
        )
    """)

    # To-device events (room keys, Olm messages) already handed to a ghost's device: a
    # transaction sent again brings them again, and an Olm message decrypted twice fails and
    # makes a new Olm session with the user's device. Kept for a week.
    await conn.execute("""
        CREATE TABLE handled_to_device (
            digest      TEXT PRIMARY KEY,
            handled_at  BIGINT NOT NULL
        )
    """)


upgrade_table.register(upgrade_v11, index=10,
                       description="Encrypted rooms, messages waiting for keys, to-device handled")
