"""Rate-limiting repeated log lines, so a flood of clients cannot flood the log.

A line is "the same" as another when it comes from the same logger with the same message
template (``record.msg`` before its arguments are filled in) at the same level. Each one passes
at most ``limit`` times per ``interval``; the rest are counted and one summary line says how many
were suppressed, once the interval is over (on the next such line, or on :meth:`flush`).

The standard library has no such filter (``logging`` only offers per-logger levels and
filters); this one is small and written here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

SUMMARY = "suppressed %d similar lines in the last %.0f s (%s: %s)"
# Where a bridge used as a library limits repeats, when its host's handlers do not: the
# loggers that abusive clients can make speak once per connection or request.
FLOODABLE = ("asyncio", "aiohttp.server", "aiohttp.web", "aiohttp.access", "dmbridge",
             "dmbridge.listener", "dmbridge.api", "dmbridge.appservice", "dmbridge.media")


@dataclass
class _Window:
    start: float
    passed: int = 0
    suppressed: int = 0
    level: int = logging.WARNING


class RepeatFilter(logging.Filter):
    """Lets each (logger, template, level) through ``limit`` times per ``interval``.

    Attach it to a handler (it sees every line that handler writes) or to a logger (only lines
    logged on that very logger). Summaries go to ``sink`` (the handler's or logger's ``handle``).
    """

    def __init__(self, sink: Callable[[logging.LogRecord], object], *, limit: int = 10,
                 interval: float = 60.0, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic,
                 only: Iterable[str] | None = None) -> None:
        super().__init__()
        self.sink = sink
        # On a handler: the loggers whose repeats are limited; every other line passes.
        self.only = frozenset(only) if only is not None else None
        self.limit = limit
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._windows: dict[tuple[str, str, int], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_summary", False):
            return True
        if self.only is not None and record.name not in self.only:
            return True
        key = (record.name, str(record.msg), record.levelno)
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now - window.start >= self.interval:
            self._summarise(key, window)
            window = None
        if window is None:
            if len(self._windows) >= self.max_keys:
                self.flush(force=True)
            window = self._windows[key] = _Window(start=now, level=record.levelno)
        if window.passed < self.limit:
            window.passed += 1
            return True
        window.suppressed += 1
        return False

    def flush(self, *, force: bool = False) -> None:
        """Summarise and forget the windows that are over (all of them with ``force``)."""
        now = self.clock()
        for key, window in list(self._windows.items()):
            if force or now - window.start >= self.interval:
                self._summarise(key, window)

    def _summarise(self, key: tuple[str, str, int], window: _Window) -> None:
        if self._windows.pop(key, None) is not window or not window.suppressed:
            return
        name, template, level = key
        elapsed = min(self.interval, self.clock() - window.start)
        record = logging.LogRecord(
            name, level, __file__, 0, SUMMARY,
            (window.suppressed, elapsed, name, _shorten(template)), None,
        )
        record.repeat_summary = True
        self.sink(record)


def _shorten(template: str, limit: int = 120) -> str:
    first = template.splitlines()[0] if template else template
    return first if len(first) <= limit else first[: limit - 3] + "..."


def limit_handlers(handlers: Iterable[logging.Handler], *, limit: int = 10,
                   interval: float = 60.0, names: Iterable[str] = FLOODABLE
                   ) -> list[RepeatFilter]:
    """Install a filter on each handler that has none yet (the command line's logging).

    Only the loggers in ``names`` are limited, as when the bridge runs as a library: the
    lines of the DM logic (recoveries, failures with their tracebacks) always pass.
    """
    added = []
    for handler in handlers:
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            repeat = RepeatFilter(handler.handle, limit=limit, interval=interval, only=names)
            handler.addFilter(repeat)
            added.append(repeat)
    return added


class LogLimits:
    """The bridge's repeat limits when it runs inside another program (as a library).

    Installs a filter on each logger in ``names`` unless the root logger's handlers already
    limit repeats (the command line's set-up), and removes them again on :meth:`remove`.
    """

    def __init__(self, names: Iterable[str] = FLOODABLE, *, limit: int = 10,
                 interval: float = 60.0) -> None:
        self.names = tuple(names)
        self.limit = limit
        self.interval = interval
        self._installed: list[tuple[logging.Logger, RepeatFilter]] = []

    @staticmethod
    def handled_by_root() -> bool:
        return any(isinstance(f, RepeatFilter)
                   for h in logging.getLogger().handlers for f in h.filters)

    def install(self) -> None:
        if self._installed or self.handled_by_root():
            return
        for name in self.names:
            logger = logging.getLogger(name)
            if any(isinstance(f, RepeatFilter) for f in logger.filters):
                continue
            repeat = RepeatFilter(logger.handle, limit=self.limit, interval=self.interval)
            logger.addFilter(repeat)
            self._installed.append((logger, repeat))

    def _filters(self) -> list[RepeatFilter]:
        on_root = [f for h in logging.getLogger().handlers for f in h.filters
                   if isinstance(f, RepeatFilter)]
        return [repeat for _, repeat in self._installed] + on_root

    def flush(self) -> None:
        """Summarise what was suppressed in windows that are over (called periodically)."""
        for repeat in self._filters():
            repeat.flush()

    def remove(self) -> None:
        """Summarise everything suppressed so far (the bridge stops), then uninstall."""
        for repeat in self._filters():
            repeat.flush(force=True)
        for logger, repeat in self._installed:
            logger.removeFilter(repeat)
        self._installed.clear()
