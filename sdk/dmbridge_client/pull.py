"""The pull loop: long-poll the network's events, run the handlers, acknowledge, keep a cursor.

- An event is acknowledged only once its handlers succeeded. A handler that raises is run
  again after a growing pause (0.5, 1, 2, ... seconds, at most 30), up to ``handler_attempts``
  times; after that the event is left unacknowledged, the loop goes on, and the bridge hands
  it out again after ``delivery.pull_ack_timeout`` (a dead letter once ``delivery.max_age``
  has passed).
- The cursor (``next_after``) is written to ``cursor_file`` once every event of an answer has
  been handled, atomically, so a restarted program continues after the last whole answer; a
  stop in the middle of an answer leaves the cursor where it was, and the rest of that answer
  comes again. The bridge also hands out again whatever was
  not acknowledged, so a crash loses nothing; a handler that had run but whose event was not
  yet acknowledged runs again (``message.reply`` then posts nothing new).
- SIGINT and SIGTERM (or :meth:`Puller.stop`) end the loop after the event being handled, with
  its acknowledgement (a handler waiting to be run again is not run again: its event is handed
  out again later); a second signal cancels the loop at once. While it runs, the loop's own
  handlers for the two signals replace any the program had set on the event loop, and are
  removed afterwards (the program's are not put back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backend import Call
from .errors import APIError, ConnectionFailed, DmbridgeError, UnexpectedAnswer

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("dmbridge_client")


def _passing(error: DmbridgeError) -> bool:
    """Whether a failed poll is worth repeating: the bridge (or a proxy before it) is down,
    restarting or failing for now. A refused token or a wrong address ends the loop."""
    if isinstance(error, ConnectionFailed):
        return True
    if isinstance(error, APIError) and error.status in (401, 403, 404):
        return False
    return isinstance(error, UnexpectedAnswer) or (
        isinstance(error, APIError) and error.status >= 500)


def _batch(answer: Any) -> dict[str, Any]:
    """The pull answer, its shape checked: a list of event objects and a cursor."""
    if not isinstance(answer["events"], list) or not all(
            isinstance(e, dict) for e in answer["events"]):
        raise TypeError("'events' is not a list of objects")
    answer["next_after"] = int(answer["next_after"])
    return dict(answer)


class Puller:
    def __init__(self, client: Client, *, cursor_file: str | os.PathLike[str] | None,
                 wait: float = 30.0, limit: int = 100, handler_attempts: int = 5) -> None:
        self.client = client
        self.cursor_file = Path(cursor_file) if cursor_file is not None else None
        self.wait = wait
        self.limit = limit
        self.handler_attempts = max(1, handler_attempts)
        self.stopping = asyncio.Event()
        self.cursor = self._read_cursor()

    def stop(self) -> None:
        self.stopping.set()

    def _read_cursor(self) -> int:
        if self.cursor_file is None or not self.cursor_file.exists():
            return 0
        text = self.cursor_file.read_text().strip()
        return int(text) if text.isdigit() else 0

    def _write_cursor(self) -> None:
        if self.cursor_file is None:
            return
        partial = self.cursor_file.with_name(self.cursor_file.name + ".tmp")
        partial.write_text(f"{self.cursor}\n")
        os.replace(partial, self.cursor_file)

    async def run(self, *, handle_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if handle_signals and \
            threading.current_thread() is threading.main_thread() else ()
        running = asyncio.current_task()

        def on_signal() -> None:
            if self.stopping.is_set() and running is not None:
                log.warning("stopping at once: the event in hand is handed out again later")
                running.cancel()
            else:
                log.info("stopping after the event in hand (a second signal stops at once)")
                self.stop()

        for sig in signals:
            loop.add_signal_handler(sig, on_signal)
        try:
            while not self.stopping.is_set():
                batch = await self._poll()
                if batch is None:
                    break
                for raw in batch["events"]:
                    if self.stopping.is_set():
                        break
                    await self._handle(raw)
                else:
                    self.cursor = max(self.cursor, int(batch["next_after"]))
                    self._write_cursor()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        log.info("stopped pulling %s events at cursor %d", self.client.network, self.cursor)

    async def _poll(self) -> dict[str, Any] | None:
        """The next answer, or None once stopped while waiting."""
        params = {"after": str(self.cursor), "wait": str(self.wait), "limit": str(self.limit)}
        pause = 0.5
        while True:
            poll = asyncio.ensure_future(self.client.backend.call(Call(
                "pullEvents", self.client.network, query=params, time_limit=self.wait + 30,
                parse=_batch)))
            stopped = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({poll, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not poll.done():
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll
                return None
            try:
                answer: dict[str, Any] = poll.result()
                return answer
            except DmbridgeError as e:
                if not _passing(e):
                    raise
                log.warning("pulling events failed: %s; trying again in %.0f s", e, pause)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), pause)
                if self.stopping.is_set():
                    return None
                pause = min(pause * 2, 30.0)

    async def _handle(self, raw: dict[str, Any]) -> None:
        pause = 0.5
        for attempt in range(1, self.handler_attempts + 1):
            try:
                await self.client.dispatch(raw)
                break
            except Exception as e:  # the handler's own errors, whatever they are
                error = e
            if attempt == self.handler_attempts:
                log.error("event %s (%s) failed %d time(s), left unacknowledged for the bridge "
                          "to hand out again: %s", raw.get("id"), raw.get("type"), attempt,
                          error, exc_info=error)
                return
            log.warning("handling event %s (%s) failed (attempt %d): %s; again in %.1f s",
                        raw.get("id"), raw.get("type"), attempt, error, pause, exc_info=error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), pause)
            if self.stopping.is_set():  # left unacknowledged: handed out again later
                log.info("stopped before running event %s again", raw.get("id"))
                return
            pause = min(pause * 2, 30.0)
        try:
            await self.client.backend.call(Call("ackEvents", self.client.network,
                                                body={"ids": [raw["id"]]}))
        except DmbridgeError as e:  # handed out again later; its handlers will not post twice
            log.warning("acknowledging event %s failed: %s", raw.get("id"), e)
