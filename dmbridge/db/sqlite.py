"""SQLite statements in one trip to aiosqlite's worker thread each.

mautrix runs a statement on aiosqlite as three trips to the thread that owns the connection
(execute, fetch, close the cursor), each a queue hand-off and an event-loop wake-up that cost
far more than the tiny statements of the hot path. Here each statement is one trip: the thread
executes it, reads every row and finishes it, so a write outside a transaction is committed
before the call returns, as before.

A statement that starts with :data:`POINT_READ` skips even that trip: it runs on the event loop
itself. Only tiny reads by unique keys are marked so (the hot path's lookups): in WAL mode a
read takes no lock that another process's write holds, so it never sleeps in ``busy_timeout``
and never blocks the loop for longer than the lookup. Writes, and any read that may touch
many rows, stay on the thread. (Running it there is safe because the one connection is taken
from mautrix's pool first: the thread runs nothing else meanwhile.)

A statement that starts with :data:`SMALL_WRITE` runs on the event loop too once its
transaction holds SQLite's write lock (an earlier write of the transaction ran on the thread,
and took it): no other process can then make it wait. Only tiny writes by unique keys are
marked so (the recording of a Matrix user's reply). A transaction's ``BEGIN`` (deferred: it
takes no lock) runs on the loop as well; its first write, and its ``COMMIT``, on the thread.
A transaction that reads before it writes (typing notifications only) begins ``IMMEDIATE`` on
the thread instead (see :data:`write_first`).
"""

# The methods keep mautrix's signatures, ``timeout`` parameters included.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from typing import Any

from mautrix.util.async_db import UpgradeTable
from mautrix.util.async_db.aiosqlite import SQLiteDatabase, TxnConnection, in_transaction
from mautrix.util.async_db.connection import LoggingConnection
from yarl import URL

POINT_READ = "/* point read */ "
"""The mark of a tiny read by unique keys, run on the event loop on SQLite (a comment in SQL)."""
SMALL_WRITE = "/* small write */ "
"""The mark of a tiny write by unique keys, run on the event loop on SQLite when its
transaction already holds the write lock (a comment in SQL)."""
# A statement that takes SQLite's write lock (run in a transaction, it holds it to the end).
_WRITE = re.compile(r"\s*(?:/\*.*?\*/\s*)*(?:INSERT|UPDATE|DELETE|REPLACE)\b", re.I | re.S)

# Transactions begun meanwhile take SQLite's write lock at once (``BEGIN IMMEDIATE``, waiting for
# another process's write as long as ``busy_timeout`` allows): for one that reads before it
# writes, whose write could otherwise not wait (SQLite does not wait to turn a read into a
# write), and would fail at once.
write_first: ContextVar[bool] = ContextVar("dmbridge_write_first", default=False)

# mautrix's rewrite of PostgreSQL's $1 placeholders to SQLite's ?1.
_POSITIONAL = re.compile(r"\$(\d+)")


@functools.lru_cache(maxsize=512)
def sqlite_sql(query: str) -> str:
    """The statement with SQLite's placeholders (the bridge's statements are few: cached)."""
    return _POSITIONAL.sub(r"?\1", query)


Run = Callable[[sqlite3.Connection, str, tuple[Any, ...]], Any]


async def _to_the_end(job: asyncio.Future[Any]) -> Any:
    """The result of a job on the database thread, waited for to its end even through
    cancellations (raised once it has ended): until then the connection is not free for the
    next statement, and a ``BEGIN`` run on the event loop must never overtake a ``ROLLBACK``
    still queued on the thread."""
    cancelled = False
    while not job.done():
        try:
            await asyncio.wait([job])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return job.result()


def _all(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[sqlite3.Row]:
    cursor = conn.execute(sql, args)
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


def _many(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> None:
    conn.executemany(sql, *args).close()


def _one(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> sqlite3.Row | None:
    cursor = conn.execute(sql, args)
    try:
        row: sqlite3.Row | None = cursor.fetchone()
        return row
    finally:
        cursor.close()  # finishes the statement: a write (INSERT ... RETURNING) is committed


class OneTripConnection:
    """What mautrix's ``LoggingConnection`` wraps, over one aiosqlite connection."""

    def __init__(self, conn: TxnConnection) -> None:
        self.conn = conn
        self._locked = False  # the open transaction holds the write lock

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """As mautrix's, but a cancelled transaction is rolled back too: left open, the
        connection would carry it to its next user, and its writes would be lost."""
        if in_transaction.get():
            yield
            return
        if write_first.get():
            try:
                await self._on_thread(_all, "BEGIN IMMEDIATE", ())  # may wait: on the thread
            except asyncio.CancelledError:  # (once it ran)
                if self.conn._conn.in_transaction:
                    await _to_the_end(asyncio.ensure_future(
                        self._on_thread(_all, "ROLLBACK", ())))
                raise
            self._locked = True
        else:
            _all(self.conn._conn, "BEGIN TRANSACTION", ())  # deferred: no lock, no wait
        token = in_transaction.set(True)
        try:
            yield
        except BaseException:
            await _to_the_end(asyncio.ensure_future(self._on_thread(_all, "ROLLBACK", ())))
            raise
        else:
            await self._on_thread(_all, "COMMIT", ())
        finally:
            self._locked = False
            in_transaction.reset(token)

    def _on_loop(self, query: str) -> bool:
        """Whether the statement runs on the event loop (see the module's description)."""
        return query.startswith(POINT_READ) or (
            self._locked and query.startswith(SMALL_WRITE) and in_transaction.get())

    async def _run(self, run: Run, query: str, args: tuple[Any, ...]) -> Any:
        if self._on_loop(query):
            return run(self.conn._conn, sqlite_sql(query), args)
        result = await self._on_thread(run, query, args)
        if not self._locked and in_transaction.get() and _WRITE.match(query):
            self._locked = True
        return result

    async def _on_thread(self, run: Run, query: str, args: tuple[Any, ...]) -> Any:
        # aiosqlite's own hand-off to its thread (``Connection._execute``), one per statement.
        # The thread runs the statement anyway: the connection goes back to the pool (and a
        # point read may use it from the event loop) only once it has.
        return await _to_the_end(asyncio.ensure_future(
            self.conn._execute(run, self.conn._conn,  # type: ignore[no-untyped-call]
                               sqlite_sql(query), args)))

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> None:
        await self._run(_all, query, args)

    async def executemany(self, query: str, *args: Any, timeout: float | None = None) -> None:
        await self._on_thread(_many, query, args)
        if in_transaction.get() and _WRITE.match(query):
            self._locked = True

    async def fetch(self, query: str, *args: Any, timeout: float | None = None
                    ) -> list[sqlite3.Row]:
        return await self._run(_all, query, args)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None
                       ) -> sqlite3.Row | None:
        return await self._run(_one, query, args)

    async def fetchval(self, query: str, *args: Any, column: int = 0,
                       timeout: float | None = None) -> Any:
        row = await self.fetchrow(query, *args)
        return None if row is None else row[column]


class OneTripSQLiteDatabase(SQLiteDatabase):
    """mautrix's SQLite database (one connection, WAL), each statement one thread trip."""

    def __init__(self, url: URL, upgrade_table: UpgradeTable, db_args: dict[str, Any],
                 log: logging.Logger) -> None:
        # Point reads use the connection from the event loop's thread, never at the same time.
        super().__init__(url, upgrade_table, {**db_args, "check_same_thread": False}, log)

    def acquire_direct(self) -> AbstractAsyncContextManager[LoggingConnection]:
        if self._parent:
            return self._parent.acquire()
        return self._one_trip()

    @asynccontextmanager
    async def _one_trip(self) -> AsyncIterator[LoggingConnection]:
        conn: LoggingConnection
        async with self._acquire() as conn:
            yield LoggingConnection(self.scheme, OneTripConnection(conn.wrapped),
                                    self.log)
