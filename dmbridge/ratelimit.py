"""Rate limits: the homeserver's (M_LIMIT_EXCEEDED, waited out) and the bridge's own pacing.

Every homeserver request, through mautrix's intents or the bridge's own send path, passes one
client middleware (:class:`HomeserverLimits`) that waits out a 429 and tries again. How long it
may wait is bounded: a platform's request has one budget for all of its homeserver calls (set by
:func:`budget_middleware`, carried in a context variable so it reaches mautrix's calls without a
parameter on every layer); background work has a budget per call. When the wait would be longer,
:class:`~dmbridge.errors.RateLimited` says when to try again, and the platform gets a 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from aiohttp import ClientRequest, ClientResponse, web
from aiohttp.client_middlewares import ClientHandlerType
from aiohttp.payload import Payload
from aiohttp.typedefs import Middleware

from .errors import RateLimited
from .homeserver import RequestLog, endpoint_of
from .metrics import Metrics
from .networks import Network
from .quotas import Quotas
from .tokenbucket import TokenBucket

log = logging.getLogger("dmbridge.ratelimit")

DEFAULT_RETRY_AFTER = 1.0  # a 429 that says nothing about when
MIN_RETRY_AFTER = 0.05  # never spin on retry_after_ms: 0
MAX_ATTEMPTS = 20  # of one request; the deadline normally ends it first
LOG_WINDOW = 60.0  # seconds over which one endpoint's 429s are summed up in one log line
MAX_HOLDS = 10_000

_deadline: ContextVar[float | None] = ContextVar("dmbridge_rate_limit_deadline", default=None)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.contextmanager
def request_budget(seconds: float) -> Iterator[None]:
    """Within this block, rate limits are waited out until ``seconds`` from now, in all."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


@contextlib.contextmanager
def default_budget(seconds: float) -> Iterator[None]:
    """As :func:`request_budget`, unless the caller (an API request) already has one."""
    if _deadline.get() is not None:
        yield
        return
    with request_budget(seconds):
        yield


def remaining(default: float) -> float:
    """Seconds left of the current request's budget; ``default`` outside a request."""
    deadline = _deadline.get()
    return default if deadline is None else max(0.0, deadline - time.monotonic())


def budget_middleware(seconds: float) -> Middleware:
    """The API's requests: each may spend ``seconds`` waiting out rate limits, in all."""

    @web.middleware
    async def budget(request: web.Request, handler: Handler) -> web.StreamResponse:
        with request_budget(seconds):
            return await handler(request)

    return budget


@dataclass
class _Storm:
    """One endpoint's 429s within a log window."""

    first_wait: float
    more: int = 0
    longest: float = 0.0
    gave_up: int = 0


class HomeserverLimits:
    """The client middleware on every homeserver session: counts each request into the
    :class:`RequestLog` and waits out ``429 M_LIMIT_EXCEEDED``.

    mautrix 0.21's HTTPAPI retries only 502/503/504 (and not at all by default): a 429 reaches
    it only when this middleware gives up, so retries do not multiply. A 429 is answered before
    the homeserver does anything, so repeating the request is safe, ``createRoom`` included.
    What the homeserver said is remembered per endpoint and user, so the next request of the
    same kind waits its turn instead of drawing another 429.
    """

    def __init__(self, requests: RequestLog, background_wait: float,
                 metrics: Metrics | None = None) -> None:
        self.requests = requests
        self.metrics = metrics if metrics is not None else Metrics()
        self.background_wait = background_wait
        self._holds: dict[tuple[str, str], float] = {}
        self._storms: dict[str, _Storm] = {}
        self._flushes: dict[str, asyncio.TimerHandle] = {}

    async def middleware(self, req: ClientRequest, handler: ClientHandlerType
                         ) -> ClientResponse:
        path = req.url.path
        template = endpoint_of(path)
        endpoint = f"{req.method} {template}"
        key = (endpoint, req.url.query.get("user_id", ""))
        deadline = time.monotonic() + remaining(self.background_wait)
        for _ in range(MAX_ATTEMPTS):
            held = self._holds.get(key) if self._holds else None
            if held is not None:
                if held > time.monotonic():
                    await self._pause(endpoint, held - time.monotonic(), deadline)
                if self._holds.get(key, 0.0) <= time.monotonic():  # not renewed meanwhile
                    self._holds.pop(key, None)
            self.requests.add(req.method, path, endpoint)
            resp = await self._timed(req, handler, template)
            if resp.status != 429:
                return resp
            wait = await _retry_after(resp)
            self._hold(key, wait)
            self._note(endpoint, wait)
            if not _replayable(req.body):
                self._note_gave_up(endpoint)
                raise RateLimited(f"the homeserver rate-limits {endpoint} and the request body"
                                  f" cannot be sent again; try again in {wait:.1f} s", wait)
        self._note_gave_up(endpoint)
        raise RateLimited(f"the homeserver kept rate-limiting {endpoint}",
                          self._holds.get(key, time.monotonic()) - time.monotonic())

    async def _timed(self, req: ClientRequest, handler: ClientHandlerType, template: str
                     ) -> ClientResponse:
        """One request, counted by its status ("error" when no answer came) and timed."""
        start = time.monotonic()
        status: int | str = "error"
        try:
            resp = await handler(req)
            status = resp.status
            return resp
        finally:
            self.metrics.homeserver_request(req.method, template, status,
                                            time.monotonic() - start)

    async def _pause(self, endpoint: str, wait: float, deadline: float) -> None:
        if time.monotonic() + wait > deadline:
            self._note_gave_up(endpoint)
            raise RateLimited(f"the homeserver rate-limits {endpoint}; try again in"
                              f" {wait:.1f} s", wait)
        await asyncio.sleep(wait)

    def _hold(self, key: tuple[str, str], wait: float) -> None:
        now = time.monotonic()
        if len(self._holds) >= MAX_HOLDS:
            self._holds = {k: t for k, t in self._holds.items() if t > now}
        self._holds[key] = max(self._holds.get(key, 0.0), now + wait)

    # --- one log line per endpoint and window, not one per request --------------------------

    def _note(self, endpoint: str, wait: float) -> None:
        storm = self._storms.get(endpoint)
        if storm is None:
            log.warning("the homeserver rate-limits %s (M_LIMIT_EXCEEDED): waiting %.1f s;"
                        " more of the same in the next %.0f s are summed up", endpoint, wait,
                        LOG_WINDOW)
            self._storms[endpoint] = _Storm(first_wait=wait)
            # The summary covers many requests: logged outside this one's context (its ID).
            self._flushes[endpoint] = asyncio.get_running_loop().call_later(
                LOG_WINDOW, self._flush, endpoint, context=contextvars.Context())
        else:
            storm.more += 1
            storm.longest = max(storm.longest, wait)

    def _note_gave_up(self, endpoint: str) -> None:
        storm = self._storms.get(endpoint)
        if storm is not None:
            storm.gave_up += 1

    def _flush(self, endpoint: str) -> None:
        self._flushes.pop(endpoint, None)
        storm = self._storms.pop(endpoint, None)
        if storm is not None and (storm.more or storm.gave_up):
            log.warning("the homeserver rate-limited %s %d more time(s) (longest wait %.1f s);"
                        " %d request(s) could not wait that long and were answered 429",
                        endpoint, storm.more, storm.longest, storm.gave_up)

    def close(self) -> None:
        """Log what is still being summed up."""
        for endpoint, handle in list(self._flushes.items()):
            handle.cancel()
            self._flush(endpoint)


def _replayable(body: Payload | bytes) -> bool:
    return isinstance(body, bytes) or not body.consumed


async def _retry_after(resp: ClientResponse) -> float:
    """Seconds the homeserver asks for: retry_after_ms, else Retry-After, else a default."""
    try:
        text = await resp.text(errors="replace")
    finally:
        resp.release()
    wait: float | None = None
    try:
        data = json.loads(text)
        ms = data.get("retry_after_ms") if isinstance(data, dict) else None
        if isinstance(ms, int | float) and not isinstance(ms, bool):
            wait = ms / 1000
    except ValueError:
        pass
    header = resp.headers.get("Retry-After", "")
    if wait is None and header.strip().isdigit():
        wait = float(header.strip())
    return max(MIN_RETRY_AFTER, DEFAULT_RETRY_AFTER if wait is None else wait)


class Pacing:
    """New rooms at the pace the bridge allows itself (a token bucket for the whole bridge),
    and within each network's new-DM quota. A burst of first contacts queues, up to the
    request's budget; past it, the platform is told when to come back."""

    def __init__(self, rate: float, burst: int, quotas: Quotas, background_wait: float) -> None:
        self.rooms = TokenBucket(rate, burst)
        self.quotas = quotas
        self.background_wait = background_wait

    @contextlib.asynccontextmanager
    async def new_room(self, network: Network) -> AsyncIterator[None]:
        """Around one room creation; the network's quota is given back if it fails."""
        give_back = self.quotas.new_dm(network)
        try:
            wait = self.rooms.delay()
            if wait > remaining(self.background_wait):
                raise RateLimited(f"the bridge opens new DMs at most {self.rooms.rate:g} a"
                                  f" second (rate_limits.room_creation); try again in"
                                  f" {wait:.1f} s", wait)
            self.rooms.take()
            if wait > 0:
                log.debug("room creation for %s waits %.1f s for its turn", network.id, wait)
                await asyncio.sleep(wait)
            yield
        except BaseException:
            give_back()
            raise
