from __future__ import annotations

from dataclasses import dataclass

from mautrix.types import EventID, RoomID
from mautrix.util.async_db import Connection, Database


@dataclass(frozen=True)
class SentMessage:
    room_id: RoomID
    event_id: EventID


class SentMessageStore:
    """Platform message IDs already sent, so a retried request never posts twice."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, network: str, remote_id: str, message_id: str) -> SentMessage | None:
        row = await self.db.fetchrow(
            "SELECT room_id, event_id FROM sent_message"
            " WHERE network=$1 AND remote_id=$2 AND message_id=$3",
            network, remote_id, message_id,
        )
        return SentMessage(row["room_id"], row["event_id"]) if row else None

    @staticmethod
    async def message_id_of(conn: Connection, network: str, remote_id: str, event_id: str
                            ) -> str | None:
        """The platform's ID of a message it sent, by the Matrix event it became."""
        value = await conn.fetchval(
            "SELECT message_id FROM sent_message WHERE event_id=$1 AND network=$2"
            " AND remote_id=$3",
            event_id, network, remote_id,
        )
        return str(value) if value is not None else None

    async def put(
        self, network: str, remote_id: str, message_id: str, sent: SentMessage, at_ms: int
    ) -> SentMessage:
        """Store the mapping; if a concurrent retry stored one first, return that one."""
        inserted = await self.db.fetchval(
            "INSERT INTO sent_message (network, remote_id, message_id, room_id, event_id,"
            " created_at) VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT (network, remote_id, message_id) DO NOTHING RETURNING event_id",
            network, remote_id, message_id, sent.room_id, sent.event_id, at_ms,
        )
        if inserted is not None:
            return sent
        return await self.get(network, remote_id, message_id) or sent
