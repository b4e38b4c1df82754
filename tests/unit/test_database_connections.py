"""The bridge's database connections: what each statement costs, and what it leaves behind."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from mautrix.util.async_db import Connection, Database

from dmbridge.db import create_database
from dmbridge.db.sqlite import POINT_READ, SMALL_WRITE
from tests.support.postgres import PostgresCluster

LOG = logging.getLogger("dmbridge.db")


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    db = create_database(f"sqlite:///{tmp_path / 'dmbridge.db'}", db_args={}, log=LOG)
    await db.start()
    yield db
    await db.stop()


async def _thread_of(db: Database, query: str) -> int:
    conn: Connection
    async with db.acquire() as conn:  # the sqlite3 connection under mautrix's and aiosqlite's
        conn.wrapped.conn._conn.create_function("thread", 0, threading.get_ident)
        return int(await conn.fetchval(query))


async def test_a_point_read_runs_on_the_event_loop_and_other_statements_on_the_thread(
        sqlite_db: Database) -> None:
    here = threading.get_ident()
    assert await _thread_of(sqlite_db, POINT_READ + "SELECT thread()") == here
    assert await _thread_of(sqlite_db, "SELECT thread()") != here


async def test_a_small_write_runs_on_the_event_loop_only_once_its_transaction_holds_the_lock(
        sqlite_db: Database, tmp_path: Path) -> None:
    await sqlite_db.execute("CREATE TABLE t (k TEXT PRIMARY KEY, thread INTEGER)")
    here = threading.get_ident()
    other = sqlite3.connect(tmp_path / "dmbridge.db", isolation_level=None)
    write = SMALL_WRITE + "INSERT INTO t (k, thread) VALUES ($1, thread()) RETURNING thread"
    conn: Connection
    try:
        other.execute("BEGIN IMMEDIATE")  # another process writes: the lock is taken
        async with sqlite_db.acquire() as conn:
            conn.wrapped.conn._conn.create_function("thread", 0, threading.get_ident)
            async with conn.transaction():
                # The first write waits for the lock on the thread, never on the event loop.
                first = asyncio.create_task(conn.fetchval(write, "a"))
                await asyncio.sleep(0.2)
                other.execute("ROLLBACK")
                assert await first != here
                # Then the transaction holds the lock: its small writes run on the loop.
                assert await conn.fetchval(write, "b") == here
            assert await conn.fetchval(write, "c") != here  # not in a transaction
        assert [k for (k,) in other.execute("SELECT k FROM t ORDER BY k")] == ["a", "b", "c"]
    finally:
        other.close()


async def test_a_write_is_committed_when_it_returns(sqlite_db: Database,
                                                    tmp_path: Path) -> None:
    await sqlite_db.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    inserted = await sqlite_db.fetchval("INSERT INTO t (k) VALUES ($1) RETURNING k", "a")
    await sqlite_db.execute("INSERT INTO t (k) VALUES ($1)", "b")
    other = sqlite3.connect(tmp_path / "dmbridge.db")  # what a new process would read
    try:
        assert inserted == "a"
        assert [k for (k,) in other.execute("SELECT k FROM t ORDER BY k")] == ["a", "b"]
    finally:
        other.close()


async def test_a_failed_transaction_leaves_nothing(sqlite_db: Database) -> None:
    await sqlite_db.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    conn: Connection
    with pytest.raises(sqlite3.IntegrityError):
        async with sqlite_db.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO t (k) VALUES ($1)", "a")
            await conn.execute("INSERT INTO t (k) VALUES ($1)", "a")
    assert await sqlite_db.fetchval("SELECT COUNT(*) FROM t") == 0
    assert await sqlite_db.fetchrow(POINT_READ + "SELECT k FROM t WHERE k=$1", "a") is None


async def test_a_cancelled_transaction_is_rolled_back_and_the_connection_stays_usable(
    sqlite_db: Database, tmp_path: Path,
) -> None:
    await sqlite_db.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    inside = asyncio.Event()

    async def cancelled() -> None:
        conn: Connection
        async with sqlite_db.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO t (k) VALUES ($1)", "lost")
            inside.set()
            await asyncio.Event().wait()  # cancelled here, mid-transaction

    task = asyncio.create_task(cancelled())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await sqlite_db.fetchval("SELECT COUNT(*) FROM t") == 0
    conn: Connection
    async with sqlite_db.acquire() as conn, conn.transaction():  # no "within a transaction"
        await conn.execute("INSERT INTO t (k) VALUES ($1)", "kept")
    other = sqlite3.connect(tmp_path / "dmbridge.db")  # committed, for others too
    try:
        assert other.execute("SELECT k FROM t").fetchall() == [("kept",)]
    finally:
        other.close()


async def test_a_transaction_cancelled_again_as_it_rolls_back_ends_once_rolled_back(
    sqlite_db: Database,
) -> None:
    """The next transaction on the connection must not begin before the rollback has run."""
    await sqlite_db.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    inside = asyncio.Event()
    entered, go = threading.Event(), threading.Event()
    thread: list[Any] = []

    def busy() -> None:
        entered.set()
        go.wait(30)

    async def cancelled() -> None:
        conn: Connection
        async with sqlite_db.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO t (k) VALUES ($1)", "lost")
            thread.append(conn.wrapped.conn)  # aiosqlite's connection, and its thread
            inside.set()
            await asyncio.Event().wait()  # cancelled here, mid-transaction

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(cancelled())
    await inside.wait()
    # The database thread is busy with something else: the ROLLBACK waits for its turn.
    other = asyncio.ensure_future(thread[0]._execute(busy))
    await loop.run_in_executor(None, entered.wait, 30)
    task.cancel()
    for _ in range(3):
        await asyncio.sleep(0)  # the task is in its rollback now
    task.cancel()  # and is cancelled again
    loop.call_later(0.1, go.set)
    with pytest.raises(asyncio.CancelledError):
        await task
    conn: Connection
    async with sqlite_db.acquire() as conn, conn.transaction():  # no "within a transaction"
        await conn.execute("INSERT INTO t (k) VALUES ($1)", "kept")
    await other
    assert [r["k"] for r in await sqlite_db.fetch("SELECT k FROM t")] == ["kept"]


async def test_a_pooled_postgres_connection_is_released_without_a_reset_query(
        pg_cluster: PostgresCluster) -> None:
    """One statement on the pool is one server round trip: no reset (``RESET ALL`` ...) after."""
    url = pg_cluster.create_database("t_no_reset")
    db = create_database(url, db_args={"min_size": 1, "max_size": 1}, log=LOG)
    await db.start()
    try:
        await db.execute("SELECT set_config('dmbridge.probe', 'kept', false)")  # session-wide
        assert await db.fetchval("SELECT current_setting('dmbridge.probe', true)") == "kept"
        conn: Connection
        with pytest.raises(asyncpg.UniqueViolationError):  # an open transaction is rolled back
            async with db.acquire() as conn, conn.transaction():
                await conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
                await conn.execute("INSERT INTO t VALUES ('a'), ('a')")
        assert not await db.table_exists("t")
    finally:
        await db.stop()


async def test_a_cancelled_executemany_gives_the_connection_back_only_once_it_has_run(
        sqlite_db: Database) -> None:
    """mautrix's state store writes rows with executemany: cancelled, the connection must not
    go back to the pool (where a point read uses it from the event loop) while SQLite's thread
    still runs the statement."""
    await sqlite_db.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    entered, go = threading.Event(), threading.Event()
    runs: list[str] = []

    def block(k: str) -> str:
        entered.set()
        go.wait(30)
        runs.append(k)
        return k

    loop = asyncio.get_running_loop()
    ended_with: list[list[str]] = []

    async def many() -> None:
        conn: Connection
        async with sqlite_db.acquire() as conn:
            conn.wrapped.conn._conn.create_function("block", 1, block)
            await conn.executemany("INSERT INTO t (k) VALUES (block($1))", [("a",), ("b",)])

    task = asyncio.create_task(many())
    task.add_done_callback(lambda _: ended_with.append(list(runs)))
    await loop.run_in_executor(None, entered.wait, 30)
    task.cancel()
    loop.call_later(0.1, go.set)  # the statement finishes a little after the cancellation
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ended_with == [["a", "b"]]  # not before the thread had run every row
    assert await sqlite_db.fetchval(POINT_READ + "SELECT COUNT(*) FROM t") == 2
