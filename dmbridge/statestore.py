"""mautrix's state store for the bridge's intents, with its memory kept bounded.

The state itself (memberships, power levels) is in the database. In memory mautrix keeps, per
ghost, whether it is registered (and presence and read markers, which the bridge does not
use), for ever: here each is an :class:`LRU`. An evicted ghost costs at most one more
``POST /register``, which mautrix sends only when no registration is known and whose
``M_USER_IN_USE`` it ignores; :meth:`dmbridge.ghosts.Ghosts.ensure_registered` checks the
database first and marks the ghost registered here again before it is used.
"""

from __future__ import annotations

from mautrix.appservice.state_store.asyncpg import PgASStateStore
from mautrix.util.async_db import Database

from .lru import LRU

# Ghosts whose registration is remembered in memory: those in use right now, with room to spare.
REGISTERED_MAX = 10_000


class BridgeStateStore(PgASStateStore):
    def __init__(self, db: Database, maxsize: int = REGISTERED_MAX) -> None:
        super().__init__(db)
        self._registered = LRU(maxsize)
        self._presence = LRU(maxsize)
        self._read = LRU(maxsize)
