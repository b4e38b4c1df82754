"""Opening the database: a failure is one clear line, and SQLite's files stay owner-only.

mautrix's SQLite start leaves aiosqlite's worker thread running when a read-only file or folder
makes its first statement fail (the process then never exits), and a missing folder ends in an
"Event loop is closed" traceback from that thread. So the file is checked, created and tried
with plain ``sqlite3`` first; mautrix opens it only once that has worked. PostgreSQL gets a few
connection attempts (it may be starting alongside the bridge), then a clear failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg
from mautrix.util.async_db import Database, DatabaseException, UpgradeTable
from yarl import URL

from ..files import PRIVATE, restrict
from ..startup import StartupError, current_user
from .postgres import UnresetConnection
from .sqlite import OneTripSQLiteDatabase
from .upgrade import upgrade_table

log = logging.getLogger("dmbridge.db")

# A session advisory lock held while the schema is created or upgraded ("dmbschem" in ASCII).
SCHEMA_LOCK_KEY = 0x646D62736368656D

# SQLite keeps these beside the database (WAL mode); they hold message data too.
SQLITE_COMPANIONS = ("-wal", "-shm")
SQLITE_BUSY_S = 5.0
PG_RETRY_FOR_S = 15.0
PG_CONNECT_TIMEOUT_S = 5.0
PG_MAX_DELAY_S = 4.0
# SQLite's page cache (64 MiB; its default is 2 MiB) and memory-mapped reads (up to 256 MiB of
# the file), so the upper levels of a big table's indexes stay in memory.
SQLITE_PRAGMAS = ("PRAGMA cache_size = -65536", "PRAGMA mmap_size = 268435456")
# PostgreSQL may be starting alongside the bridge: these are worth another attempt.
RETRYABLE = (OSError, TimeoutError, asyncpg.CannotConnectNowError,
             asyncpg.TooManyConnectionsError)


class DatabaseUnavailable(StartupError):
    """The database cannot be opened or used."""


def create_database(url: str, *, db_args: dict[str, int], log: logging.Logger) -> Database:
    if is_sqlite(url):  # mautrix adds WAL and the busy timeout to the init commands
        return OneTripSQLiteDatabase(URL(url), upgrade_table,
                                     {**db_args, "init_commands": list(SQLITE_PRAGMAS)}, log)
    return Database.create(url, upgrade_table=upgrade_table,
                           db_args={**db_args, "connection_class": UnresetConnection}, log=log)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


async def start_database(db: Database, url: str, *, extra: Sequence[UpgradeTable] = ()) -> None:
    """Open (creating or upgrading the schema, then the ``extra`` tables such as mautrix's state
    store, all in the same turn) or raise :class:`DatabaseUnavailable`."""
    path = Path(URL(url).path) if is_sqlite(url) else None
    turn: asyncpg.Connection | None = None
    if path is not None:
        await asyncio.to_thread(prepare_sqlite, path)
    else:
        turn = await wait_for_postgres(url)
    try:
        if turn is not None:
            # Workers started together create or upgrade the schema one at a time; the lock
            # goes with this connection's session, closed below whatever happens.
            await turn.execute("SELECT pg_advisory_lock($1)", SCHEMA_LOCK_KEY)
        await db.start()
        for table in extra:  # their CREATE TABLEs have no IF NOT EXISTS: inside the turn too
            await table.upgrade(db)
    except DatabaseException as e:  # e.g. a schema newer than this version knows
        raise DatabaseUnavailable(f"database {safe_url(url)}: {e}; run the dmbridge version "
                                  "that wrote it, or restore a backup") from e
    except (OSError, sqlite3.Error, asyncpg.PostgresError) as e:
        raise DatabaseUnavailable(f"database {safe_url(url)}: {e}") from e
    finally:
        if turn is not None:
            await turn.close()
    if path is not None:
        await asyncio.to_thread(restrict_sqlite_files, path)


def prepare_sqlite(path: Path) -> None:
    """Fail with the cause and the fix unless SQLite can write ``path`` (and beside it)."""
    who = current_user()
    folder = path.parent
    if not folder.is_dir():
        raise DatabaseUnavailable(
            f"database {path}: the folder {folder} does not exist; create it, writable by "
            f"{who}, or change database.url")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DatabaseUnavailable(
            f"database {path}: the folder {folder} is not writable by {who} ({_owner(folder)}); "
            f"SQLite creates {path.name}-wal and {path.name}-shm beside the database, so make "
            "the folder writable by that user, or change database.url")
    for file in (path, *sqlite_companions(path)):
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            raise DatabaseUnavailable(
                f"database {path}: {file.name} is read-only for {who} ({_owner(file)}); "
                "make it readable and writable by that user (chown), or change database.url")
    if not path.exists():
        try:  # owner-only from the start; SQLite gives -wal and -shm the database's mode
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE))
        except FileExistsError:
            pass
    restrict_sqlite_files(path)
    _try_write(path)


def _try_write(path: Path) -> None:
    """What mautrix does first (WAL on), then a write lock, released at once."""
    try:
        conn = sqlite3.connect(path, timeout=SQLITE_BUSY_S, isolation_level=None)
    except sqlite3.Error as e:
        raise DatabaseUnavailable(f"database {path}: SQLite cannot open it: {e}") from e
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    except sqlite3.DatabaseError as e:
        raise DatabaseUnavailable(f"database {path}: {_sqlite_cause(e)}") from e
    finally:
        conn.close()


def _sqlite_cause(e: sqlite3.DatabaseError) -> str:
    text = str(e)
    if "locked" in text:
        return (f"locked by another process for more than {SQLITE_BUSY_S:g} s ({text}); is "
                "another dmbridge running on it? Stop it, or change database.url")
    if "not a database" in text:
        return (f"not an SQLite database ({text}); restore it from a backup, or change "
                "database.url")
    if "readonly" in text:
        return (f"SQLite cannot write to it ({text}) as {current_user()}; make the file and its "
                "folder writable by that user, or change database.url")
    return f"SQLite cannot use it: {text}"


def sqlite_companions(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in SQLITE_COMPANIONS]


def restrict_sqlite_files(path: Path) -> None:
    """The database, its -wal and -shm: owner-only (files made by an older version were not)."""
    for file in (path, *sqlite_companions(path)):
        try:
            if restrict(file):
                log.info("%s: made readable by its owner only", file)
        except OSError as e:
            log.warning("%s: could not take away group and other permissions: %s", file, e)


def _owner(path: Path) -> str:
    st = os.stat(path)
    return f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


async def wait_for_postgres(url: str) -> asyncpg.Connection:
    """Connect; retry refused or timed-out connections for a little while, then fail."""
    deadline = time.monotonic() + PG_RETRY_FOR_S
    delay, attempts = 0.5, 0
    while True:
        attempts += 1
        try:
            conn = await asyncpg.connect(url, timeout=PG_CONNECT_TIMEOUT_S)
        except RETRYABLE as e:
            if time.monotonic() + delay > deadline:
                raise DatabaseUnavailable(postgres_failure(
                    url, e, f", {attempts} attempts in {PG_RETRY_FOR_S:g} s")) from e
            log.warning("database %s: cannot connect (%s); trying again in %g s",
                        safe_url(url), _pg_cause(e), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, PG_MAX_DELAY_S)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as e:
            raise DatabaseUnavailable(postgres_failure(url, e)) from e
        else:
            return conn


def postgres_failure(url: str, e: BaseException, tried: str = "") -> str:
    """Why PostgreSQL at ``url`` cannot be used, and what to do; ``tried`` says how often."""
    where = f"database {safe_url(url)}"
    if isinstance(e, RETRYABLE):
        return (f"{where}: cannot connect ({_pg_cause(e)}){tried}; check that PostgreSQL runs "
                "and accepts connections there, or change database.url")
    if isinstance(e, (asyncpg.InvalidPasswordError,
                      asyncpg.InvalidAuthorizationSpecificationError)):
        return (f"{where}: PostgreSQL refused the login ({e}); check the user and password in "
                "database.url and pg_hba.conf")
    if isinstance(e, asyncpg.InvalidCatalogNameError):
        return f"{where}: {e}; create it (createdb -O USER NAME), or change database.url"
    return f"{where}: {e}"


def _pg_cause(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return f"no answer within {PG_CONNECT_TIMEOUT_S:g} s"
    return str(e) or type(e).__name__


def safe_url(url: str) -> str:
    """The database URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url
