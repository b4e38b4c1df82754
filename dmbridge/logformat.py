"""The command line's log formats: ``text`` (one readable line) or ``json`` (JSON lines).

Both show the request ID that :class:`dmbridge.requestid.RequestIdFilter` puts on a record:
text as a ``[req-...]`` prefix of the message, JSON as the ``request_id`` field.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from .requestid import tag

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(request_tag)s%(message)s"


class TextFormatter(logging.Formatter):
    """``2026-12-02 07:44:08,123 INFO dmbridge.api: [req-1a2b3c4d5e6f] message``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        rid = tag(record)
        record.request_tag = f"[{rid}] " if rid else ""
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id, and
    the traceback (``exception``) or stack (``stack``) when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": tag(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII only: a lone surrogate or odd byte in a message cannot break the line.
        return json.dumps(entry, ensure_ascii=True, default=str)


def formatter(name: str) -> logging.Formatter:
    return JsonFormatter() if name == "json" else TextFormatter()
