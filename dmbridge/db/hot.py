"""The send path's statements, without mautrix's layers around each one.

``Database.fetchrow`` goes through four context managers and two wrapper objects before the
statement runs, which costs more than the statement itself on the hot path. These functions
take the connection straight from the pool (SQLite's one connection, or asyncpg's pool), run
the statement as the connection layers below do (:mod:`.sqlite`: a point read on the event
loop, anything else in one trip to SQLite's thread), and report it to the same metrics. Inside
a caller's ``acquire()`` (a transaction), they use its connection as mautrix would.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mautrix.util.async_db import Database
from mautrix.util.async_db.asyncpg import PostgresDatabase
from mautrix.util.async_db.database import conn_var

from .sqlite import POINT_READ, OneTripConnection, OneTripSQLiteDatabase, sqlite_sql
from .timing import observer

log = logging.getLogger("dmbridge.db")
SLOW_S = 1.0  # as mautrix: a statement slower than this is logged as a warning


async def fetchrow(db: Database, query: str, *args: Any) -> Any:
    """The statement's first row (None if none)."""
    return await _run(db, "fetchrow", query, args, one=True)


async def fetch(db: Database, query: str, *args: Any) -> list[Any]:
    """Every row of the statement."""
    rows: list[Any] = await _run(db, "fetch", query, args, one=False)
    return rows


async def _run(db: Database, kind: str, query: str, args: tuple[Any, ...], *, one: bool
               ) -> Any:
    if conn_var.get(None) is not None or not isinstance(
            db, (OneTripSQLiteDatabase, PostgresDatabase)):  # a caller's connection, or a stand-in
        return await (db.fetchrow(query, *args) if one else db.fetch(query, *args))
    start = time.monotonic()
    try:
        if isinstance(db, OneTripSQLiteDatabase):
            return await _sqlite(db, query, args, one)
        async with db.pool.acquire() as conn:
            return await (conn.fetchrow(query, *args) if one else conn.fetch(query, *args))
    finally:
        duration = time.monotonic() - start
        report = observer(db)
        if report is not None:
            report(kind, duration)
        if duration > SLOW_S:
            log.warning("%s(%r) took %.3f seconds", kind, query, duration)


async def _sqlite(db: OneTripSQLiteDatabase, query: str, args: tuple[Any, ...], one: bool
                  ) -> Any:
    pool = db._pool
    if query.startswith(POINT_READ) and not pool.empty():
        # The connection is free: nothing can take it before this returns (no await).
        conn = pool.get_nowait()
        try:
            cursor = conn._conn.execute(sqlite_sql(query), args)
            try:
                return cursor.fetchone() if one else cursor.fetchall()
            finally:
                cursor.close()
        finally:
            pool.put_nowait(conn)
    if db._stopped:
        raise RuntimeError("database pool has been stopped")
    conn = await pool.get()
    try:
        trip = OneTripConnection(conn)
        return await (trip.fetchrow(query, *args) if one else trip.fetch(query, *args))
    finally:
        pool.put_nowait(conn)
