"""Media a platform uploaded through the bridge: only these may be sent or become avatars."""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.types import ContentURI
from mautrix.util.async_db import Database


@dataclass(frozen=True)
class Media:
    content_uri: ContentURI
    network: str
    mimetype: str
    size: int
    filename: str | None = None
    width: int | None = None
    height: int | None = None


class MediaStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, media: Media, at_ms: int) -> None:
        await self.db.execute(
            "INSERT INTO media (content_uri, network, mimetype, size, filename, width, height,"
            " created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT (content_uri) DO NOTHING",
            media.content_uri, media.network, media.mimetype, media.size, media.filename,
            media.width, media.height, at_ms,
        )

    async def get(self, network: str, content_uri: str) -> Media | None:
        row = await self.db.fetchrow(
            "SELECT content_uri, network, mimetype, size, filename, width, height FROM media"
            " WHERE content_uri=$1 AND network=$2",
            content_uri, network,
        )
        return Media(**dict(row)) if row else None
