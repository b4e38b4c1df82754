"""Which bridge processes are alive: a 'creating' claim whose process died is recovered at once.

Every process start has a random instance ID, written into the claims it takes, and holds a
presence for as long as it lives; the kernel ends a killed process's presence at once, so no
heartbeat interval or timeout has to be tuned:
- PostgreSQL (workers may be on several hosts): a connection named ``dmbridge/<instance>``; an
  instance is alive iff ``pg_stat_activity`` lists such a connection.
- SQLite (one host): an exclusive ``flock`` on ``<database>.instances/<instance>``; alive iff
  that lock cannot be taken. SQLite takes one bridge process: :class:`SoleWorker` refuses a
  second at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import time
from pathlib import Path
from typing import IO

import asyncpg
from mautrix.util.async_db import Database
from yarl import URL

from .db.dm import ABANDONED, DMRecord
from .startup import StartupError

log = logging.getLogger("dmbridge.instances")

_PREFIX = "dmbridge/"


class Instances:
    def __init__(self, db: Database, database_url: str, creation_timeout: float) -> None:
        self.id = secrets.token_hex(8)
        self.db = db
        self.database_url = database_url
        self.postgres = not database_url.startswith("sqlite")
        self.creation_timeout = creation_timeout
        self._presence: asyncpg.Connection | None = None
        self._folder = None if self.postgres else _lock_folder(database_url)
        self._lock: IO[bytes] | None = None
        self._connecting = asyncio.Lock()

    async def start(self) -> None:
        if self.postgres:
            await self._connect()
        elif self._folder is not None:
            self._lock = _hold(self._folder, self.id)
            for path in self._folder.iterdir():  # presences of processes that were killed
                if path.name != self.id:
                    self._locked(path.name)  # removes the file of a process that is gone

    async def stop(self) -> None:
        if self._presence is not None:
            await self._presence.close()
            self._presence = None
        if self._lock is not None and self._folder is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._folder / self.id)
            self._lock.close()
            self._lock = None

    async def _connect(self) -> None:
        self._presence = await asyncpg.connect(
            self.database_url, server_settings={"application_name": _PREFIX + self.id})

    async def ensure_present(self) -> None:
        """Before this process takes a claim: the others must be able to see it alive (the
        presence connection may have dropped, e.g. when PostgreSQL restarted)."""
        if not self.postgres:
            return
        async with self._connecting:
            if self._presence is not None and not self._presence.is_closed():
                try:  # a dropped connection shows only when used (one round trip per new DM)
                    await self._presence.execute("SELECT 1")
                    return
                except Exception as e:  # any failure means the connection is gone
                    # A terminated connection may surface as OSError, PostgresError,
                    # InterfaceError or asyncpg's InternalClientError ("another operation").
                    log.debug("presence check failed: %r", e)
            if self._presence is not None:
                self._presence.terminate()
                log.warning("the presence connection to PostgreSQL was lost; reconnecting")
            await self._connect()

    async def creator_alive(self, record: DMRecord) -> bool:
        """Is the process holding this claim still at work on it?

        Callers hold the pair's in-process lock, so a claim of this very process is a leftover
        of a request that died without cleaning up. A claim older than ``creation_timeout`` is
        treated as dead too, whatever holds it: the homeserver is asked what it made.
        """
        if record.instance in (self.id, ABANDONED):
            return False
        if (time.time() * 1000 - record.updated_at) > self.creation_timeout * 1000:
            return False
        if record.instance is None:
            return True  # a claim from a version that did not record it: only time tells
        if not self.postgres:
            return self._locked(record.instance)
        try:  # others see this process dead meanwhile; come back for them
            await self.ensure_present()
        except (OSError, asyncpg.PostgresError) as e:
            log.warning("could not reopen the presence connection: %r", e)
        found = await self.db.fetchval(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = $1",
            _PREFIX + record.instance,
        )
        return bool(found)

    def _locked(self, instance: str) -> bool:
        if self._folder is None or not instance.isalnum():
            return False
        path = self._folder / instance
        try:
            with open(path, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            path.unlink()  # its process is gone
        return False


class SoleWorker:
    """On SQLite, the one bridge process: ``<database>.instances/worker.lock`` held until stop.

    The file is never removed (a process opening it as another unlinks it could lock a file
    nobody else sees); it names the holder's pid for the message that refuses a second.
    """

    def __init__(self, database_url: str) -> None:
        self.database = URL(database_url).path
        folder = _lock_folder(database_url) if database_url.startswith("sqlite") else None
        self.path = folder / "worker.lock" if folder is not None else None
        self._lock: IO[bytes] | None = None

    def hold(self, *, strict: bool) -> None:
        """Raise :class:`StartupError` if another process holds it. Without ``strict``, a folder
        that cannot be written is left for the database's own start-up check to explain."""
        if self.path is None or self._lock is not None:
            return
        try:
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            lock = open(self.path, "a+b")  # held until release
        except OSError as e:
            if not strict:
                return
            raise StartupError(f"database {self.database}: cannot create {self.path}: "
                               f"{e.strerror or e}; make its folder writable") from e
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().decode(errors="replace").strip()
            lock.close()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise StartupError(
                f"database {self.database}: another dmbridge{pid} is already running on this"
                " SQLite database, and SQLite takes one bridge process; stop the other one, or"
                " move to PostgreSQL (database.url) to run several workers") from None
        lock.truncate(0)
        lock.write(str(os.getpid()).encode())
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _hold(folder: Path, instance: str) -> IO[bytes]:
    """This process's presence: the lock is held until the file is closed, or the process ends."""
    folder.mkdir(mode=0o700, exist_ok=True)
    lock = open(folder / instance, "wb")  # held until stop
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return lock


def _lock_folder(database_url: str) -> Path | None:
    """Beside the SQLite file; None for an in-memory database (one process, nothing to tell)."""
    path = database_url.removeprefix("sqlite:").removeprefix("//")
    if not path or path.startswith(":memory:") or "mode=memory" in path:
        return None
    return Path(path.split("?", 1)[0] + ".instances")


# pg_try_advisory_lock key of the one worker with encryption on ("dmbe" as an integer).
ENCRYPTION_LOCK = 0x646D6265


class EncryptingWorker:
    """With encryption on, the one worker: each ghost's Olm account, sessions and room keys
    are held in the memory of the process using them, and two processes ratcheting their own
    copies would corrupt them. On PostgreSQL a session advisory lock, on a connection of its
    own, refuses a second worker at start; on SQLite :class:`SoleWorker` already does."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._conn: asyncpg.Connection | None = None

    async def hold(self, instance_id: str) -> None:
        log.info("encryption is on: this must be the bridge's only worker")
        if self.database_url.startswith("sqlite"):
            return
        name = f"dmbridge-encryption/{instance_id}"
        conn = await asyncpg.connect(self.database_url,
                                     server_settings={"application_name": name})
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ENCRYPTION_LOCK):
            holder = await conn.fetchval(
                "SELECT a.application_name || ' from ' || COALESCE(host(a.client_addr), 'a local"
                " socket') FROM pg_locks l JOIN pg_stat_activity a"
                " ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.objid = $1 LIMIT 1",
                ENCRYPTION_LOCK)
            await conn.close()
            raise StartupError(
                "dm.encryption is on and another bridge worker on this database already runs"
                f" with it (the encryption lock is held by {holder or 'another connection'}):"
                " encrypted DMs take one worker only; stop the other worker, or set"
                " dm.encryption: off on every worker")
        self._conn = conn

    async def release(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
