"""The pairs' current DMs in memory, so a warm send asks the database nothing about its DM.

Coherence rule: every statement that may change what a pair's DM record says (its ``dm`` row,
the members of its room in ``room_member``, its ghost's name and avatar in ``ghost``) runs
inside :meth:`DMCache.writing` and names what it changes with :meth:`DMCache.changed`. A change
forgets the entries it touches at once, and they are neither read nor filled again until the
statement's transaction has ended (committed or rolled back). A lookup fills the cache only if
no change happened while it read the database, so a record read before a commit is never kept
after it.

The cache serves SQLite, where one bridge process writes. Another process may still commit
(``dmbridge forget``, ``dmbridge clear-declined``): SQLite's ``data_version`` moves when it
does; a send reads it with its idempotency check, and :meth:`DMCache.saw_data_version` then
forgets everything. The recording of a homeserver transaction reads it with its first write
(the claim of an event), after which no other process can commit until it does: from then
on, :meth:`DMCache.in_room` answers for that transaction. On PostgreSQL several
workers write and no worker could know at once what the others committed: the cache is not
used there (the send reads its DM with the check that the message was not sent already, in
the one round trip it needs anyway).
"""

from __future__ import annotations

import contextvars
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from mautrix.types import UserID
from mautrix.util.async_db import Connection, Database

from ..lru import LRU

if TYPE_CHECKING:
    from .dm import DMRecord

MAX_ENTRIES = 10_000  # pairs remembered; about 1 KiB each

Pair = tuple[UserID, UserID]
Change = tuple[str, str]
"""What a write touches: ``("pair", ghost_id + TAB + user_id)``, ``("room", room_id)`` or
``("ghost", ghost_id)``."""


def pair(ghost_id: str, user_id: str) -> Change:
    return ("pair", f"{ghost_id}\t{user_id}")


def room(room_id: str) -> Change:
    return ("room", room_id)


def ghost(ghost_id: str) -> Change:
    return ("ghost", ghost_id)


class _Scope:
    """The changes of one transaction, held until it ends."""

    def __init__(self, cache: DMCache) -> None:
        self.cache = cache
        self.changes: set[Change] = set()
        # The transaction has written, and read SQLite's data_version since: nothing another
        # process commits can come between that and the end of the transaction.
        self.settled = False


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "dmbridge_dm_cache_scope", default=None)


class DMCache:
    """The current DM of recently used pairs, by (ghost, user); bounded, least recently used
    dropped first."""

    def __init__(self, *, enabled: bool, maxsize: int = MAX_ENTRIES) -> None:
        self.enabled = enabled  # only one process writes (SQLite)
        self.version = 0  # moves on with every change
        self._data_version: int | None = None  # SQLite's, when last seen
        self._entries: LRU[Pair, DMRecord] = LRU(maxsize)
        self._by_room: dict[str, Pair] = {}
        self._by_ghost: dict[str, set[Pair]] = {}
        self._held: Counter[Change] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    # --- reading ----------------------------------------------------------------------------

    def get(self, ghost_id: UserID, user_id: UserID) -> DMRecord | None:
        """The pair's DM as last read, if it can be trusted now (after
        :meth:`saw_data_version`)."""
        if not self.enabled:
            return None
        record = self._entries.get((ghost_id, user_id))
        if record is None or (self._held and self._is_held(record)):
            return None
        return record

    def fill(self, record: DMRecord, read_at: int) -> None:
        """Remember ``record``, read from the database when :attr:`version` was ``read_at``,
        unless something changed since (then it may be stale)."""
        if read_at != self.version or not self.enabled or (self._held and self._is_held(record)):
            return
        key = (record.ghost_id, record.user_id)
        if key not in self._entries and len(self._entries) >= self._entries.maxsize:
            old_key, old = self._entries.popitem(last=False)
            self._unindex(old_key, old)
        elif key in self._entries:
            self._unindex(key, self._entries[key])
        self._entries[key] = record
        if record.room_id is not None:
            self._by_room[record.room_id] = key
        self._by_ghost.setdefault(record.ghost_id, set()).add(key)

    def in_room(self, room_id: str) -> DMRecord | None:
        """The DM of a room as last read, if it can be trusted in the current transaction
        (see :meth:`settled`)."""
        scope = _scope.get()
        if not self.enabled or scope is None or scope.cache is not self or not scope.settled:
            return None
        key = self._by_room.get(room_id)
        if key is None:
            return None
        record = self._entries.get(key)
        if record is None or record.room_id != room_id or (self._held and self._is_held(record)):
            return None
        return record

    def settled(self, data_version: int) -> None:
        """The current transaction has written, and read SQLite's ``data_version`` after:
        nothing another process commits can come before its end (SQLite lets one writer at
        a time), so the cache answers for it once it knows of the commits before."""
        self.saw_data_version(data_version)
        scope = _scope.get()
        if scope is not None and scope.cache is self:
            scope.settled = True

    def saw_data_version(self, data_version: int) -> None:
        """SQLite's ``PRAGMA data_version`` now: if it moved (or was not known yet), another
        process may have committed, and what it changed is not known: everything is
        forgotten."""
        if data_version != self._data_version:
            self.clear()
            self._data_version = data_version

    def _is_held(self, record: DMRecord) -> bool:
        held = self._held
        return (pair(record.ghost_id, record.user_id) in held
                or ghost(record.ghost_id) in held
                or (record.room_id is not None and room(record.room_id) in held))

    # --- writing ----------------------------------------------------------------------------

    @asynccontextmanager
    async def writing(self, db: Database, *, atomic: bool = False
                      ) -> AsyncIterator[Connection]:
        """A connection for statements that change DM records; ``atomic``: in a transaction.

        Inside another :meth:`writing`, its connection and transaction. Otherwise the changes
        named meanwhile are held until it ends.
        """
        conn: Connection
        outer = _scope.get()
        if outer is not None and outer.cache is self:
            async with db.acquire() as conn:
                yield conn
            return
        scope = _Scope(self)
        token = _scope.set(scope)
        try:
            async with db.acquire() as conn:
                if atomic:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn
        finally:
            _scope.reset(token)
            self._release(scope)

    def changed(self, *changes: Change) -> None:
        """These are being changed by the current :meth:`writing`'s statements.

        Outside one (a statement on a connection of the caller's own), they are forgotten at
        once and not held.
        """
        scope = _scope.get()
        self.version += 1
        for change in changes:
            self._forget(change)
            if scope is not None and scope.cache is self and change not in scope.changes:
                scope.changes.add(change)
                self._held[change] += 1

    def _release(self, scope: _Scope) -> None:
        self.version += 1
        for change in scope.changes:
            self._forget(change)
            self._held[change] -= 1
            if self._held[change] <= 0:
                del self._held[change]

    def clear(self) -> None:
        self.version += 1
        self._entries.clear()
        self._by_room.clear()
        self._by_ghost.clear()

    # --- the entries and their indexes ------------------------------------------------------

    def _forget(self, change: Change) -> None:
        kind, key = change
        if kind == "pair":
            ghost_id, _, user_id = key.partition("\t")
            keys: Iterable[Pair] = [(UserID(ghost_id), UserID(user_id))]
        elif kind == "room":
            found = self._by_room.get(key)
            keys = [found] if found is not None else []
        else:
            keys = list(self._by_ghost.get(key, ()))
        for k in keys:
            record = self._entries.pop(k, None)
            if record is not None:
                self._unindex(k, record)

    def _unindex(self, key: Pair, record: DMRecord) -> None:
        if record.room_id is not None and self._by_room.get(record.room_id) == key:
            del self._by_room[record.room_id]
        pairs = self._by_ghost.get(record.ghost_id)
        if pairs is not None:
            pairs.discard(key)
            if not pairs:
                del self._by_ghost[record.ghost_id]


__all__ = ["DMCache", "ghost", "pair", "room"]
