"""A token bucket: a steady rate with bursts, for pacing and quotas."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up. Taking may run into debt, so
    takers queue: each waits :meth:`delay` (measured before it takes) for its turn."""

    def __init__(self, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def delay(self) -> float:
        """Seconds until the next token is free (0.0: now)."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)

    def take(self) -> None:
        self._refill()
        self._tokens -= 1.0

    def give_back(self) -> None:
        self._refill()
        self._tokens = min(self.burst, self._tokens + 1.0)
