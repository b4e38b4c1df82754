"""Every statement of the DM store searches an index: none reads the whole table, however many
DMs there are."""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from mautrix.types import RoomID, UserID
from mautrix.util.async_db import Database, Scheme

from dmbridge.db import Stores
from dmbridge.db.dm import DMStore

GHOST = UserID("@dm_sms_a:example.org")
USER = UserID("@alice:example.org")
ROOM = RoomID("!r:example.org")


class Planned:
    """Stands in for the database (or a connection): each statement is explained, then run."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.plans: dict[str, list[str]] = {}

    async def _explain(self, query: str, args: tuple[Any, ...]) -> None:
        if self.db.scheme == Scheme.SQLITE:
            rows = await self.db.fetch("EXPLAIN QUERY PLAN " + query, *args)
            self.plans[query] = [str(row["detail"]) for row in rows]
            return
        async with self.db.acquire() as conn, conn.transaction():
            # The planner reads a tiny table whole whatever its indexes; told not to, it still
            # does when no index can answer the statement.
            await conn.execute("SET LOCAL enable_seqscan = off")
            rows = await conn.fetch("EXPLAIN " + query, *args)
            self.plans[query] = [str(row[0]) for row in rows]

    async def execute(self, query: str, *args: Any) -> Any:
        await self._explain(query, args)
        return await self.db.execute(query, *args)

    async def fetch(self, query: str, *args: Any) -> Any:
        await self._explain(query, args)
        return await self.db.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        await self._explain(query, args)
        return await self.db.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        await self._explain(query, args)
        return await self.db.fetchval(query, *args)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Planned]:
        yield self

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield


def every_method(store: DMStore, conn: Any) -> dict[str, Callable[[], Awaitable[object]]]:
    """A call of each public method of the store, with arguments that reach all its statements."""
    return {
        "claim": lambda: store.claim(GHOST, USER, "sms", "a", "c1", "i1", 1),
        "abandon": lambda: store.abandon(GHOST, USER, "c1"),
        "unfinished": lambda: store.unfinished(),
        "activate_in": lambda: store.activate_in(conn, GHOST, USER, "other", ROOM, 2),
        # a claim that moved on: the second statement checks whether the room is the pair's
        "activate": lambda: store.activate(GHOST, USER, "other", ROOM, 2),
        "release": lambda: store.release(GHOST, USER, "c1"),
        "adopt": lambda: store.adopt(conn, GHOST, USER, "sms", "a", ROOM, "active", "x", 3),
        "keep_ended": lambda: store.keep_ended(conn, GHOST, USER, "sms", "a", RoomID("!e:x"),
                                               "x", 3),
        "get_current": lambda: store.get_current(GHOST, USER),
        "current_in": lambda: DMStore.current_in(conn, GHOST, USER),
        "get_for_send": lambda: store.get_for_send(GHOST, USER, "sms", "a", "m1"),
        "get_by_room": lambda: store.get_by_room(ROOM),
        "by_room": lambda: DMStore.by_room(conn, ROOM),
        "in_room": lambda: store.in_room(conn, ROOM),
        "of_user": lambda: store.of_user(USER),
        "of_ghost": lambda: store.of_ghost(GHOST),
        "rooms_of_ghost": lambda: store.rooms_of_ghost(GHOST),
        "active_rooms_of_ghost": lambda: store.active_rooms_of_ghost(GHOST),
        "find": find_every_way(store),
        "count_by_state": lambda: store.count_by_state(),
        "set_state": lambda: store.set_state(conn, ROOM, "declined", "x", 4),
        "end": lambda: store.end(ROOM, 5),
        "replace_with_claim": lambda: store.replace_with_claim(conn, ROOM, "replacing", "c2",
                                                               "i1", 6),
        "restore_replaced": lambda: store.restore_replaced(ROOM, "replacing", None, 7),
        "change_ended_reason": lambda: DMStore.change_ended_reason(conn, ROOM, "replacing",
                                                                   "replaced", 8),
        "ended_for": lambda: store.ended_for("replaced"),
        "ended_with_ghost_joined": lambda: store.ended_with_ghost_joined("replaced"),
    }


def find_every_way(store: DMStore) -> Callable[[], Awaitable[object]]:
    async def run() -> None:
        for filters in ({}, {"network": "sms"}, {"user_id": USER}, {"ghost_id": GHOST},
                        {"network": "sms", "user_id": USER},
                        {"network": "sms", "ghost_id": GHOST},
                        {"network": "sms", "user_id": USER, "ghost_id": GHOST}):
            await store.find(**filters)
    return run


# Only creations in progress are in dm_creating: it may be read from its start.
READ_FROM_START = ("dm_creating",)
# The listing index is read in the order of the list, up to its limit: right for a network's
# list, not for a user's or a ghost's few DMs.
LISTING = "dm_active_listing"
NARROW = re.compile(r"dm\.(user_id|ghost_id) = \$")
# A search on these alone finds most of the table.
UNSELECTIVE = ("network", "state")
_SQLITE_STEP = re.compile(
    r"^(SCAN|SEARCH) (\w+)(?: USING (?:COVERING |PRIMARY KEY )?INDEX (\w+))?(?: \((\w+))?")


def reads_too_much(query: str, step: str, tables: set[str], scheme: Scheme) -> bool:
    """Does this plan step read a whole table, or search one on an unselective column?"""
    if scheme != Scheme.SQLITE:
        return re.search(rf"Seq Scan on ({'|'.join(tables)})\b", step) is not None
    match = _SQLITE_STEP.match(step.strip())
    if match is None or match[2] not in tables or match[3] in READ_FROM_START:
        return False
    if match[3] == LISTING:
        return NARROW.search(query) is not None
    return match[1] == "SCAN" or match[4] in UNSELECTIVE


async def test_every_dm_statement_searches_an_index(stores: Stores) -> None:
    db = stores.db
    planned = Planned(db)
    store = DMStore(planned, stores.dms.cache)  # type: ignore[arg-type]  # for the database
    calls = every_method(store, planned)
    public = {name for name, _ in inspect.getmembers(DMStore, inspect.isfunction)
              if not name.startswith("_")}
    assert set(calls) == public  # a new method of the store is checked here too
    async with db.acquire() as conn:  # an active DM, so that every statement runs
        await stores.dms.adopt(conn, GHOST, USER, "sms", "a", ROOM, "active", "x", 1)
    for call in calls.values():
        await call()
    if db.scheme == Scheme.SQLITE:
        tables = {str(r["name"]) for r in await db.fetch(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    else:
        tables = {str(r["tablename"]) for r in await db.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert len(planned.plans) > len(public)
    for query, plan in planned.plans.items():
        if "GROUP BY state" in query:  # the metrics' count of every row: from its index only
            read = "SCAN dm USING INDEX dm_state" if db.scheme == Scheme.SQLITE else " dm_state "
            assert [step for step in plan if read in step], plan
            assert not [step for step in plan if "Seq Scan" in step], plan
            continue
        assert not [step for step in plan if reads_too_much(query, step, tables, db.scheme)], (
            query, plan)


@pytest.mark.parametrize("filters", [{}, {"network": "chat"}, {"user_id": USER},
                                     {"network": "sms", "ghost_id": GHOST}])
async def test_the_dm_list_is_the_oldest_active_dms_matching_the_filters(
        stores: Stores, filters: dict[str, str]) -> None:
    made = []
    for i, (network, ghost, user) in enumerate([
            ("sms", GHOST, USER), ("chat", UserID("@dm_chat_b:x"), USER),
            ("sms", UserID("@dm_sms_c:x"), UserID("@bob:x")), ("chat", UserID("@dm_chat_d:x"),
                                                              UserID("@bob:x")),
            ("sms", GHOST, UserID("@carol:x"))]):
        room = f"!{i}:x"
        async with stores.db.acquire() as conn:
            await stores.dms.adopt(conn, ghost, user, network, "r", room, "active", "x",
                                   100 - i)
        made.append((network, ghost, user, room))
    async with stores.db.acquire() as conn:
        await stores.dms.adopt(conn, GHOST, USER, "sms", "r", "!old:x", "ended", "x", 1)
    expected = sorted(
        (m for m in made if filters.get("network", m[0]) == m[0]
         and filters.get("ghost_id", m[1]) == m[1] and filters.get("user_id", m[2]) == m[2]),
        key=lambda m: made.index(m), reverse=True)  # the oldest first
    found = await stores.dms.find(limit=2, **filters)  # type: ignore[arg-type]
    assert [dm.room_id for dm in found] == [m[3] for m in expected][:2]
