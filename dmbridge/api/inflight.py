"""Operations begun in the bridge's process (not over HTTP), so that stopping waits for them.

The listener waits for the requests it is answering before the bridge closes the homeserver
session and the database; :class:`InFlight` does the same for in-process calls: once closing,
it refuses new calls (503, as a listener that is going away), waits for those begun (a long
poll ends at once), and only then lets the bridge stop what they use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..errors import NotReady

log = logging.getLogger("dmbridge.api")
T = TypeVar("T")
SHUTDOWN_WAIT = 60.0  # as long as the listener waits for its requests (aiohttp's default)


class InFlight:
    """The in-process operations running now."""

    def __init__(self) -> None:
        self.closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._interruptible: set[asyncio.Task[Any]] = set()

    def begin(self, operation: Coroutine[Any, Any, T], *, interruptible: bool = False
              ) -> asyncio.Task[T]:
        """``operation`` running, held until it ends; refused (NotReady) once closing.
        An ``interruptible`` one (a long poll) is cancelled when the bridge stops."""
        if self.closing:
            operation.close()
            raise NotReady("the bridge is stopping")
        task = asyncio.ensure_future(operation)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if interruptible:
            self._interruptible.add(task)
            task.add_done_callback(self._interruptible.discard)
        return task

    async def close(self, wait: float = SHUTDOWN_WAIT) -> None:
        """Refuses new operations, then waits for those begun (at most ``wait`` seconds;
        the rest are cancelled)."""
        self.closing = True
        for task in list(self._interruptible):
            task.cancel()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=wait)
        if pending:
            log.warning("stopping: cancelling %d in-process operation(s) still running after "
                        "%.0f s", len(pending), wait)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
