"""Repeated log lines: let through a few, count the rest, say how many in one summary line."""

from __future__ import annotations

import logging
import uuid

from dmbridge.logfilter import LogLimits, RepeatFilter, limit_handlers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test.logfilter.{uuid.uuid4().hex[:8]}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger


def test_each_template_passes_limit_times_per_interval_then_one_summary() -> None:
    lines, clock = Lines(), Clock()
    lines.addFilter(RepeatFilter(lines.handle, limit=3, interval=60, clock=clock))
    log = _logger(lines)
    for i in range(1000):
        log.warning("connection from %s closed", f"10.0.0.{i}")
    log.warning("another kind of line")
    assert lines.lines == [
        f"WARNING {log.name}: connection from 10.0.0.{i} closed" for i in range(3)
    ] + [f"WARNING {log.name}: another kind of line"]

    clock.now += 60  # the interval is over: the next such line brings the summary first
    log.warning("connection from %s closed", "10.0.0.9")
    assert lines.lines[-2:] == [
        f"WARNING {log.name}: suppressed 997 similar lines in the last 60 s "
        f"({log.name}: connection from %s closed)",
        f"WARNING {log.name}: connection from 10.0.0.9 closed",
    ]


def test_flush_summarises_windows_that_are_over_and_only_those() -> None:
    lines, clock = Lines(), Clock()
    repeat = RepeatFilter(lines.handle, limit=1, interval=10, clock=clock)
    lines.addFilter(repeat)
    log = _logger(lines)
    for _ in range(5):
        log.error("boom")
    repeat.flush()
    assert len(lines.lines) == 1  # the window is still open
    clock.now += 10
    repeat.flush()
    assert lines.lines[-1] == f"ERROR {log.name}: suppressed 4 similar lines in the last 10 s " \
                              f"({log.name}: boom)"
    repeat.flush()
    assert len(lines.lines) == 2  # said once
    log.error("boom")
    assert lines.lines[-1] == f"ERROR {log.name}: boom"


def test_levels_and_loggers_are_counted_apart() -> None:
    lines, clock = Lines(), Clock()
    lines.addFilter(RepeatFilter(lines.handle, limit=1, interval=10, clock=clock))
    a, b = _logger(lines), _logger(lines)
    for log in (a, b):
        log.warning("same")
        log.warning("same")
        log.error("same")
    assert lines.lines == [f"WARNING {a.name}: same", f"ERROR {a.name}: same",
                           f"WARNING {b.name}: same", f"ERROR {b.name}: same"]


def test_limit_handlers_installs_once_per_handler() -> None:
    handler = Lines()
    assert len(limit_handlers([handler])) == 1
    assert limit_handlers([handler]) == []
    assert sum(isinstance(f, RepeatFilter) for f in handler.filters) == 1


def test_log_limits_filter_named_loggers_and_remove_them_again() -> None:
    lines = Lines()
    log = _logger(lines)
    limits = LogLimits([log.name], limit=2, interval=60)
    limits.install()
    for _ in range(10):
        log.warning("flood")
    assert len(lines.lines) == 2
    limits.remove()  # says what it held back, then lets everything through again
    assert lines.lines[-1].startswith(f"WARNING {log.name}: suppressed 8 similar lines in the "
                                      "last 0 s")
    log.warning("flood")
    assert len(lines.lines) == 4


def test_a_handler_filter_limits_only_the_floodable_loggers() -> None:
    """The command line's filter leaves the DM logic's lines alone (recoveries, tracebacks)."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    [repeat] = limit_handlers([handler], limit=2)
    for name in ("aiohttp.server", "dmbridge.opening"):
        for i in range(5):
            record = logging.LogRecord(name, logging.ERROR, __file__, 0, "failed %d", (i,), None)
            if repeat.filter(record):
                seen.append(record)
    assert [r.name for r in seen].count("aiohttp.server") == 2
    assert [r.name for r in seen].count("dmbridge.opening") == 5
