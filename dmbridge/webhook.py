"""One signed POST of one outbox item to a network's webhook."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from . import __version__, signing
from .db.outbox import OutboxItem
from .networks import Network

DELIVERY_HEADER = "X-Dmbridge-Delivery"
ATTEMPT_HEADER = "X-Dmbridge-Attempt"
MAX_RETRY_AFTER = 30 * 24 * 3600.0  # beyond any sane max_age; keeps the arithmetic finite


@dataclass(frozen=True)
class Outcome:
    ok: bool
    error: str = ""
    retry_after: float | None = None
    """Seconds the receiver asked us to wait (``Retry-After``), if it did."""


Present = Callable[[dict[str, Any]], dict[str, Any]]


def as_stored(event: dict[str, Any]) -> dict[str, Any]:
    return event


def body_of(item: OutboxItem, present: Present = as_stored) -> bytes:
    """The exact bytes a receiver gets (and the signature covers)."""
    return json.dumps(present(item.event()), ensure_ascii=False, separators=(",", ":")).encode()


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(MAX_RETRY_AFTER,
               max(0.0, when.timestamp() - (time.time() if now is None else now)))


class WebhookClient:
    def __init__(self, session: aiohttp.ClientSession, timeout: float,
                 present: Present = as_stored) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.present = present

    async def post(self, network: Network, item: OutboxItem, attempt: int) -> Outcome:
        url, secret = network.delivery.url, network.delivery.secret
        assert url is not None and secret is not None
        body = body_of(item, self.present)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"dmbridge/{__version__}",
            "Idempotency-Key": item.idempotency_key,
            DELIVERY_HEADER: str(item.id),
            ATTEMPT_HEADER: str(attempt),
            **signing.sign(secret, body),
        }
        try:
            async with self.session.post(url, data=body, headers=headers,
                                         timeout=self.timeout) as resp:
                if 200 <= resp.status < 300:
                    return Outcome(ok=True)
                text = (await resp.text(errors="replace"))[:200]
                return Outcome(ok=False, error=f"HTTP {resp.status}: {text}",
                               retry_after=retry_after(resp.headers.get("Retry-After")))
        except TimeoutError:
            return Outcome(ok=False, error=f"no answer within {self.timeout.total} s")
        except aiohttp.ClientError as e:
            return Outcome(ok=False, error=f"{type(e).__name__}: {e}")
