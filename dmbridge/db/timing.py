"""Time spent in database statements, measured at the one place every statement passes.

mautrix's ``Database`` hands out connections from ``acquire_direct`` (its ``execute``,
``fetch`` ... and every ``async with db.acquire()`` go through it); :func:`time_queries` makes
it hand out a :class:`TimedConnection` instead, which reports each statement's duration.
"""

# The methods keep mautrix's signatures, ``timeout`` parameters included.
# ruff: noqa: ASYNC109

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from mautrix.util.async_db import Database
from mautrix.util.async_db.connection import LoggingConnection

Observe = Callable[[str, float], None]
"""Told the kind of call (``execute``, ``fetch`` ...) and its duration in seconds."""

_observers: weakref.WeakKeyDictionary[Database, Observe] = weakref.WeakKeyDictionary()


def observer(db: Database) -> Observe | None:
    """What :func:`time_queries` reports ``db``'s statements to (for :mod:`.hot`)."""
    return _observers.get(db)


class TimedConnection(LoggingConnection):
    """A mautrix connection whose statements report how long they took."""

    def __init__(self, inner: LoggingConnection, observe: Observe) -> None:
        self._observe = observe  # before the parent freezes the fields
        super().__init__(inner.scheme, inner.wrapped, inner.log, inner._handle_exception)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        start = time.monotonic()
        try:
            return await super().execute(query, *args, timeout=timeout)
        finally:
            self._observe("execute", time.monotonic() - start)

    async def executemany(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        start = time.monotonic()
        try:
            return await super().executemany(query, *args, timeout=timeout)
        finally:
            self._observe("executemany", time.monotonic() - start)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        start = time.monotonic()
        try:
            return await super().fetch(query, *args, timeout=timeout)
        finally:
            self._observe("fetch", time.monotonic() - start)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        start = time.monotonic()
        try:
            return await super().fetchrow(query, *args, timeout=timeout)
        finally:
            self._observe("fetchrow", time.monotonic() - start)

    async def fetchval(self, query: str, *args: Any, column: int = 0,
                       timeout: float | None = None) -> Any:
        start = time.monotonic()
        try:
            return await super().fetchval(query, *args, column=column, timeout=timeout)
        finally:
            self._observe("fetchval", time.monotonic() - start)


def time_queries(db: Database, observe: Observe) -> None:
    """Report every statement run on ``db`` (through any of its connections) to ``observe``."""
    direct = db.acquire_direct
    _observers[db] = observe

    @asynccontextmanager
    async def acquire_direct() -> AsyncIterator[LoggingConnection]:
        async with direct() as conn:
            yield TimedConnection(conn, observe)

    db.acquire_direct = acquire_direct  # type: ignore[method-assign]
