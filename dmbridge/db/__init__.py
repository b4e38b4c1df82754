"""The bridge's tables, one module each, all sharing one mautrix ``Database``."""

from __future__ import annotations

import time
from dataclasses import dataclass

from mautrix.util.async_db import Database

from .dm import DMStore
from .event import ProcessedEventStore
from .ghost import GhostStore
from .member import MemberStore
from .message import SentMessageStore
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
    events: ProcessedEventStore

    @classmethod
    def over(cls, db: Database) -> Stores:
        return cls(
            db=db,
            ghosts=GhostStore(db),
            dms=DMStore(db),
            members=MemberStore(db),
            messages=SentMessageStore(db),
            events=ProcessedEventStore(db),
        )


__all__ = ["Stores", "now_ms", "upgrade_table"]
