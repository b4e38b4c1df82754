"""The message map, both ways: what platforms sent (by their IDs) and what Matrix users sent."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from dataclasses import dataclass
from typing import Any

from mautrix.types import EventID, RoomID
from mautrix.util.async_db import Connection, Database
from mautrix.util.async_db.database import conn_var

from . import hot
from .sqlite import SMALL_WRITE

MESSAGE = "message"
EDIT = "edit"
REACTION = "reaction"

_SENT_COLUMNS = "room_id, event_id, kind, target_event_id, redacted_at"
MAX_BATCH = 100  # rows in one INSERT (8 parameters each: well within either database's limit)
_KEY = tuple[str, str, str]  # network, remote_id, message_id


@functools.lru_cache(maxsize=MAX_BATCH)
def _insert_rows(n: int) -> str:
    values = ", ".join(
        "(" + ", ".join(f"${i * 8 + j}" for j in range(1, 9)) + ")" for i in range(n))
    return ("INSERT INTO sent_message (network, remote_id, message_id, room_id, event_id,"
            f" created_at, kind, target_event_id) VALUES {values}"
            " ON CONFLICT (network, remote_id, message_id) DO NOTHING"
            " RETURNING network, remote_id, message_id")


@dataclass(frozen=True)
class SentMessage:
    room_id: RoomID
    event_id: EventID
    kind: str = MESSAGE
    target_event_id: EventID | None = None
    redacted_at: int | None = None


class MappingNotWritten(Exception):
    """A sent message's mapping could not be stored; the database's error is its cause."""


def _sent(row: Any) -> SentMessage:
    return SentMessage(row["room_id"], row["event_id"], row["kind"], row["target_event_id"],
                       row["redacted_at"])


class SentMessageStore:
    """Platform message IDs already sent, so a retried request never posts twice."""

    def __init__(self, db: Database) -> None:
        self.db = db
        # Mappings waiting for the INSERT after the one being written (group commit).
        self._waiting: list[tuple[tuple[Any, ...], asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def get(self, network: str, remote_id: str, message_id: str) -> SentMessage | None:
        row = await self.db.fetchrow(
            f"SELECT {_SENT_COLUMNS} FROM sent_message"
            " WHERE network=$1 AND remote_id=$2 AND message_id=$3",
            network, remote_id, message_id,
        )
        return _sent(row) if row else None

    async def sender_of(self, network: str, message_id: str) -> str | None:
        """Which of the network's remote users sent ``message_id`` (if any did)."""
        value = await self.db.fetchval(
            "SELECT remote_id FROM sent_message WHERE network=$1 AND message_id=$2 LIMIT 1",
            network, message_id,
        )
        return str(value) if value is not None else None

    @staticmethod
    async def by_event(conn: Connection, network: str, remote_id: str, event_id: str
                       ) -> tuple[str, str] | None:
        """The platform's ID and the kind of what it sent, by the Matrix event it became."""
        row = await conn.fetchrow(
            "SELECT message_id, kind FROM sent_message WHERE event_id=$1 AND network=$2"
            " AND remote_id=$3",
            event_id, network, remote_id,
        )
        return (str(row["message_id"]), str(row["kind"])) if row else None

    @staticmethod
    async def redacted_by_user(conn: Connection, network: str, remote_id: str, event_id: str,
                               at_ms: int) -> None:
        """The Matrix user deleted what the platform sent: it can no longer be a target."""
        await conn.execute(
            "UPDATE sent_message SET redacted_at=$4 WHERE event_id=$1 AND network=$2"
            " AND remote_id=$3 AND redacted_at IS NULL",
            event_id, network, remote_id, at_ms,
        )

    async def put(
        self, network: str, remote_id: str, message_id: str, sent: SentMessage, at_ms: int
    ) -> SentMessage:
        """Store the mapping, committed when this returns; if a concurrent retry stored one
        first, return that one.

        Mappings put while an INSERT is being written go together in the next one (one
        statement and one commit for all of them), so many sends in flight share commits.
        Never inside a caller's ``acquire()``: the mapping is committed on a connection of its
        own (on SQLite, the one connection the caller holds).
        """
        assert conn_var.get(None) is None, "put() inside a caller's acquire() would wait forever"
        row = (network, remote_id, message_id, sent.room_id, sent.event_id, at_ms, sent.kind,
               sent.target_event_id)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, done))
        if self._writer is None:  # in a context of its own: never in a caller's transaction
            self._writer = asyncio.create_task(self._write(), context=contextvars.Context())
            self._writer.add_done_callback(self._written)
        if await asyncio.shield(done):
            return sent
        return await self.get(network, remote_id, message_id) or sent

    async def drain(self) -> None:
        """Wait until every mapping put so far is written (or has failed)."""
        while self._writer is not None:
            await asyncio.wait([self._writer])

    def _written(self, task: asyncio.Task[None]) -> None:
        """The writer ended: if it was cancelled before it ran, what waits fails (once it ran,
        it has done this itself)."""
        if self._writer is task:
            self._writer = None
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for _, done in waiting:
            if not done.done():
                done.set_exception(RuntimeError("the bridge is stopping"))

    async def _write(self) -> None:
        """Write what waits, a batch per statement, until nothing does."""
        try:
            await self._write_batches()
        finally:
            self._writer = None
            self._fail_waiting()  # only if this was cancelled

    async def _write_batches(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            # In key order, so that two workers' batches take the same keys' locks in the same
            # order (PostgreSQL would otherwise deadlock them); stable: the first put of a key
            # is still the one written.
            batch.sort(key=lambda waiting: waiting[0][:3])
            try:
                inserted = await self._insert([row for row, _ in batch])
            except Exception as e:
                await self._write_one_by_one(batch, e)
                continue
            except BaseException:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(RuntimeError("the write was cancelled"))
                raise
            self._answer(batch, inserted)

    async def _write_one_by_one(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[bool]]],
                                e: Exception) -> None:
        """The batch failed: each row alone, so one bad row fails only its own put. After two
        rows in a row fail, the database is failing, not the rows: the rest are not tried."""
        failures = 0
        for row, done in batch:
            if done.done():
                continue
            if len(batch) == 1 or failures >= 2:
                error = MappingNotWritten(f"the message map could not be written: {e}")
                error.__cause__ = e
                done.set_exception(error)
                continue
            try:
                inserted = await self._insert([row])
            except Exception as own:
                failures += 1
                error = MappingNotWritten(f"the message map could not be written: {own}")
                error.__cause__ = own
                done.set_exception(error)
                continue
            except BaseException:
                for _, rest in batch:
                    if not rest.done():
                        rest.set_exception(RuntimeError("the write was cancelled"))
                raise
            failures = 0
            self._answer([(row, done)], inserted)

    @staticmethod
    def _answer(batch: list[tuple[tuple[Any, ...], asyncio.Future[bool]]], inserted: set[_KEY]
                ) -> None:
        for row, done in batch:
            key = (row[0], row[1], row[2])
            mine = key in inserted
            inserted.discard(key)  # a second put of the same ID in the batch lost
            if not done.done():
                done.set_result(mine)

    async def _insert(self, rows: list[tuple[Any, ...]]) -> set[_KEY]:
        """One INSERT of every row; the keys of the rows it inserted (not already there)."""
        written = await hot.fetch(self.db, _insert_rows(len(rows)),
                                  *(value for row in rows for value in row))
        return {(str(r[0]), str(r[1]), str(r[2])) for r in written}

    async def mark_redacted(self, network: str, remote_id: str, message_id: str, at_ms: int
                            ) -> None:
        await self.db.execute(
            "UPDATE sent_message SET redacted_at=$4 WHERE network=$1 AND remote_id=$2"
            " AND message_id=$3 AND redacted_at IS NULL",
            network, remote_id, message_id, at_ms,
        )


@dataclass(frozen=True)
class MatrixMessage:
    """A Matrix user's event that a platform was given (a message, an edit, a reaction)."""

    event_id: EventID
    room_id: RoomID
    network: str
    remote_id: str
    user_id: str
    kind: str
    target_event_id: EventID | None = None
    reaction_key: str | None = None
    redacted_at: int | None = None

    def of_dm(self, network: str, remote_id: str, user_id: str) -> bool:
        """Was this given to that DM's platform (not to another contact or Matrix user)?"""
        return (self.network, self.remote_id, self.user_id) == (network, remote_id, user_id)


_MATRIX_COLUMNS = ("event_id, room_id, network, remote_id, user_id, kind, target_event_id,"
                   " reaction_key")


class MatrixMessageStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    async def add(conn: Connection, message: MatrixMessage, at_ms: int) -> None:
        await conn.execute(
            SMALL_WRITE + f"INSERT INTO matrix_message ({_MATRIX_COLUMNS}, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (event_id) DO NOTHING",
            message.event_id, message.room_id, message.network, message.remote_id,
            message.user_id, message.kind, message.target_event_id, message.reaction_key, at_ms,
        )

    @staticmethod
    async def redacted(conn: Connection, event_id: str, at_ms: int) -> None:
        await conn.execute(
            "UPDATE matrix_message SET redacted_at=$2 WHERE event_id=$1 AND redacted_at IS NULL",
            event_id, at_ms,
        )

    @staticmethod
    async def get_in(conn: Connection | Database, event_id: str) -> MatrixMessage | None:
        row = await conn.fetchrow(
            f"SELECT {_MATRIX_COLUMNS}, redacted_at FROM matrix_message WHERE event_id=$1",
            event_id,
        )
        return MatrixMessage(**dict(row)) if row else None

    async def get(self, event_id: str) -> MatrixMessage | None:
        return await self.get_in(self.db, event_id)
