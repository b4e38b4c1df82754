"""The bridge's tables, one module each, all sharing one mautrix ``Database``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mautrix.util.async_db import Connection, Database, Scheme

from . import sqlite
from .connect import DatabaseUnavailable, create_database, safe_url, start_database
from .dm import DMStore
from .dmcache import DMCache
from .encrypted_room import EncryptedRoomStore
from .event import ProcessedEventStore
from .ghost import GhostStore
from .history import HistoryStore
from .invite import InviteStore
from .media import MediaStore
from .member import MemberStore
from .message import MatrixMessageStore, SentMessageStore
from .outbox import OutboxStore
from .undecrypted import UndecryptedStore
from .undelivered import UndeliveredStore
from .upgrade import upgrade_table


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Stores:
    db: Database
    ghosts: GhostStore
    dms: DMStore
    members: MemberStore
    messages: SentMessageStore
    matrix_messages: MatrixMessageStore
    media: MediaStore
    events: ProcessedEventStore
    outbox: OutboxStore
    history: HistoryStore
    invites: InviteStore
    undelivered: UndeliveredStore
    encrypted_rooms: EncryptedRoomStore
    undecrypted: UndecryptedStore

    @classmethod
    def over(cls, db: Database) -> Stores:
        """The stores over ``db``; the DM cache serves SQLite only (see :class:`DMCache`)."""
        cache = DMCache(enabled=db.scheme == Scheme.SQLITE)
        return cls(
            db=db,
            ghosts=GhostStore(db, cache),
            dms=DMStore(db, cache),
            members=MemberStore(db, cache),
            messages=SentMessageStore(db),
            matrix_messages=MatrixMessageStore(db),
            media=MediaStore(db),
            events=ProcessedEventStore(db, cache),
            outbox=OutboxStore(db),
            history=HistoryStore(db),
            invites=InviteStore(db),
            undelivered=UndeliveredStore(db),
            encrypted_rooms=EncryptedRoomStore(db),
            undecrypted=UndecryptedStore(db),
        )

    @asynccontextmanager
    async def transaction(self, *, write_first: bool = False) -> AsyncIterator[Connection]:
        """A transaction that may change DMs, their rooms' members or their ghosts: the DM
        cache learns of its changes. ``write_first``: it reads before it writes, and on SQLite
        takes the write lock from its start (see :data:`.sqlite.write_first`)."""
        token = sqlite.write_first.set(write_first)
        try:
            async with self.dms.cache.writing(self.db, atomic=True) as conn:
                yield conn
        finally:
            sqlite.write_first.reset(token)


__all__ = [
    "DatabaseUnavailable", "Stores", "create_database", "now_ms", "safe_url", "start_database",
    "upgrade_table",
]
