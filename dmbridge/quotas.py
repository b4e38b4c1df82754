"""Per-network quotas: how fast a platform may send, and how many new DMs it may open.

Counted in this process: with several workers, each allows the quota (the load balancer
splits a network's traffic between them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import QuotaExceeded
from .tokenbucket import TokenBucket

if TYPE_CHECKING:
    from .networks import Network


@dataclass(frozen=True)
class QuotaSettings:
    """``networks[].quotas``; 0 turns a quota off."""

    messages_per_second: float = 20.0
    message_burst: int = 100
    new_dms_per_hour: int = 600


def _nothing() -> None:
    pass


class Quotas:
    """Each network's buckets, made on first use."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._messages: dict[str, TokenBucket] = {}
        self._new_dms: dict[str, TokenBucket] = {}

    def message(self, network: Network) -> None:
        """One message, edit, reaction or deletion; QuotaExceeded when the network is too fast."""
        q = network.quotas
        if not q.messages_per_second:
            return
        bucket = self._bucket(self._messages, network.id, q.messages_per_second,
                              max(1, q.message_burst))
        _take(bucket, lambda wait: (
            f"network '{network.id}' may send {q.messages_per_second:g} messages a second"
            f" (burst {q.message_burst}; networks[].quotas); try again in {wait:.2f} s"))

    def new_dm(self, network: Network) -> Callable[[], None]:
        """One new DM room; returns what gives it back (if the room is not made after all)."""
        per_hour = network.quotas.new_dms_per_hour
        if not per_hour:
            return _nothing
        bucket = self._bucket(self._new_dms, network.id, per_hour / 3600, per_hour)
        _take(bucket, lambda wait: (
            f"network '{network.id}' may open {per_hour} new DMs an hour"
            f" (networks[].quotas.new_dms_per_hour); try again in {wait:.0f} s"))
        return bucket.give_back

    def _bucket(self, buckets: dict[str, TokenBucket], network_id: str, rate: float,
                burst: int) -> TokenBucket:
        bucket = buckets.get(network_id)
        if bucket is None:
            bucket = buckets[network_id] = TokenBucket(rate, burst, self._clock)
        return bucket


def _take(bucket: TokenBucket, refusal: Callable[[float], str]) -> None:
    """One token, or QuotaExceeded saying (``refusal``) when the next one comes."""
    wait = bucket.delay()
    if wait > 0:
        raise QuotaExceeded(refusal(wait), wait)
    bucket.take()
