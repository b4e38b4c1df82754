"""Original times of messages: a platform that delivers late (a queued SMS, imported history)
says when the message was really written, and the Matrix event shows that time.

The homeserver takes it from the appservice as the ``ts`` query parameter of the send
(``origin_server_ts`` of the event). Clients order a room by its events, not their times: a
late message is shown after the ones sent before it, with its own time.
"""

from __future__ import annotations

from .errors import InvalidParam

MAX_AHEAD_MS = 300_000  # clocks differ: up to five minutes ahead of the bridge's is accepted
EARLIEST_MS = 631_152_000_000  # 1990-01-01T00:00:00Z: anything older is a unit mistake


def check_origin_ts(ts: int, now_ms: int) -> int:
    """``ts`` (milliseconds since the epoch) if it can be a message's time; else a 400."""
    if ts > now_ms + MAX_AHEAD_MS:
        raise InvalidParam(
            f"'ts' {ts} is {(ts - now_ms) / 1000:.0f} s ahead of the bridge's clock; at most"
            f" {MAX_AHEAD_MS // 1000} s ahead is accepted (milliseconds since the epoch)")
    if ts < EARLIEST_MS:
        seconds = EARLIEST_MS <= ts * 1000 <= now_ms + MAX_AHEAD_MS
        hint = " (seconds given for milliseconds?)" if seconds else ""
        raise InvalidParam(f"'ts' {ts} is before 1990-01-01; it must be milliseconds since the"
                           f" epoch{hint}")
    return ts
