"""Prometheus metrics: one registry per bridge, the families it fills, and ``GET /metrics``.

Each :class:`Metrics` owns its own ``CollectorRegistry``, so several bridges in one process (a
test run, a host embedding the bridge) never share or collide. Counters and histograms are
filled where things happen (the listener's middleware, the homeserver client middleware, the
transaction handler, the outbox, the database's query methods); what lives in the database
(DMs by state, the outbox backlog, dead letters) is counted when scraped, at most as often as
the counting is cheap (see :class:`DatabaseGauges`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from .db import Stores

log = logging.getLogger("dmbridge.metrics")

# Seconds: from a quick local database query up to a homeserver request waiting out limits.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
DB_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
              0.5, 1.0, 5.0)
UNMATCHED = "(unmatched)"  # the route label of a request that matched no route
# The database counts are refreshed at most once per this many times what counting took: a
# count that takes 20 ms on a big database is made at most every 2 s, whatever the scrapes.
COUNT_COST_FACTOR = 100
# Event types counted by name; any other is counted as "other" (types are free-form).
EVENT_TYPES = frozenset({
    "m.room.message", "m.room.member", "m.reaction", "m.room.redaction", "m.room.encrypted",
    "m.room.create", "m.room.encryption", "m.room.name", "m.room.avatar", "m.room.topic",
    "m.room.power_levels", "m.sticker",
})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Metrics:
    """Every metric family of one bridge, in its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "dmbridge_http_requests", "Requests answered by the bridge's listener (the platform "
            "API and the homeserver's calls), by route and status.",
            ["method", "route", "status"], registry=r)
        self.http_duration = Histogram(
            "dmbridge_http_request_duration_seconds", "Time to answer a request on the "
            "listener, by route.", ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_process_calls = Counter(
            "dmbridge_in_process_calls", "Platform API operations called in the bridge's "
            "process (dmbridge.embedded), not over the listener, by operationId and status.",
            ["operation", "status"], registry=r)
        self.in_process_duration = Histogram(
            "dmbridge_in_process_call_duration_seconds", "Time to perform an operation called "
            "in the bridge's process, by operationId.", ["operation"], buckets=LATENCY_BUCKETS,
            registry=r)
        self.homeserver_requests = Counter(
            "dmbridge_homeserver_requests", "Requests the bridge made to the homeserver, by "
            "endpoint (IDs replaced by placeholders) and status ('error': no answer).",
            ["method", "endpoint", "status"], registry=r)
        self.homeserver_duration = Histogram(
            "dmbridge_homeserver_request_duration_seconds", "Time until the homeserver's answer "
            "(its headers) arrived, by endpoint.", ["method", "endpoint"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.transactions = Counter(
            "dmbridge_transactions", "Transactions the homeserver sent, by outcome (recorded; "
            "failed: answered 500, the homeserver sends it again; invalid: answered 400 or "
            "refused for its token).", ["outcome"], registry=r)
        self.events = Counter(
            "dmbridge_events", "Events in the homeserver's transactions, by type and outcome "
            "(processed; duplicate: seen before; skipped: not storable or malformed).",
            ["type", "outcome"], registry=r)
        self.deliveries = Counter(
            "dmbridge_deliveries", "Items handed to platforms, by network and outcome "
            "(delivered: a webhook accepted it or a pull acknowledged it; retried: a webhook "
            "attempt failed and is retried later; dead_lettered: given up).",
            ["network", "outcome"], registry=r)
        self.db_duration = Histogram(
            "dmbridge_db_query_duration_seconds", "Time spent in database statements, by kind "
            "of call.", ["operation"], buckets=DB_BUCKETS, registry=r)
        self.dms = Gauge(
            "dmbridge_dms", "DM rows in the database, by state (active, creating, joining, "
            "declined, ended).", ["state"], registry=r)
        self.outbox_backlog = Gauge(
            "dmbridge_outbox_backlog", "Items waiting to be delivered to a network.",
            ["network"], registry=r)
        self.outbox_oldest = Gauge(
            "dmbridge_outbox_oldest_age_seconds", "How long the oldest item waiting for a "
            "network has been queued (0 when none waits).", ["network"], registry=r)
        self.dead_letters = Gauge(
            "dmbridge_dead_letters", "Dead letters kept for a network (until retried).",
            ["network"], registry=r)

    # --- filled where things happen -----------------------------------------------------------

    def homeserver_request(self, method: str, endpoint: str, status: int | str,
                           seconds: float) -> None:
        self.homeserver_requests.labels(method, endpoint, str(status)).inc()
        self.homeserver_duration.labels(method, endpoint).observe(seconds)

    def in_process_call(self, operation: str, status: int, seconds: float) -> None:
        self.in_process_calls.labels(operation, str(status)).inc()
        self.in_process_duration.labels(operation).observe(seconds)

    def transaction(self, outcome: str) -> None:
        self.transactions.labels(outcome).inc()

    def event(self, event_type: object, outcome: str) -> None:
        kind = event_type if isinstance(event_type, str) and event_type in EVENT_TYPES else "other"
        self.events.labels(kind, outcome).inc()

    def delivery(self, network: str, outcome: str, count: int = 1) -> None:
        if count:
            self.deliveries.labels(network, outcome).inc(count)

    def db_query(self, operation: str, seconds: float) -> None:
        self.db_duration.labels(operation).observe(seconds)

    def middleware(self) -> Any:
        """The listener's requests: counted by route and status, timed."""
        metrics = self

        @web.middleware
        async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
            start = time.monotonic()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as e:
                status = e.status
                raise
            finally:
                route = route_of(request)
                metrics.http_requests.labels(request.method, route, str(status)).inc()
                metrics.http_duration.labels(request.method, route).observe(
                    time.monotonic() - start)

        return observe


def route_of(request: web.Request) -> str:
    """The matched route's template (``/_dmbridge/v1/networks/{network}/dms``), never the path:
    paths carry IDs without end."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


class Counts(Protocol):
    """What the database gauges are read from."""

    async def dms_by_state(self) -> dict[str, int]: ...

    async def backlog(self) -> dict[str, tuple[int, int]]: ...

    async def dead_letters(self) -> dict[str, int]: ...


class StoreCounts:
    """:class:`Counts` from the bridge's tables."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores

    async def dms_by_state(self) -> dict[str, int]:
        return await self.stores.dms.count_by_state()

    async def backlog(self) -> dict[str, tuple[int, int]]:
        return await self.stores.outbox.backlog()

    async def dead_letters(self) -> dict[str, int]:
        return await self.stores.outbox.dead_counts()


class DatabaseGauges:
    """Fills the gauges that count database rows, on scrape, at most as often as it is cheap."""

    def __init__(self, metrics: Metrics, counts: Counts, networks: Collection[str],
                 clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.counts = counts
        self.networks = list(networks)
        self.clock = clock
        self._next = 0.0

    async def refresh(self) -> None:
        """Count again, unless the last count was too recent for what it cost."""
        now = self.clock()
        if now < self._next:
            return
        dms = await self.counts.dms_by_state()
        backlog = await self.counts.backlog()
        dead = await self.counts.dead_letters()
        wall = self.clock()
        self._next = now + max(0.0, wall - now) * COUNT_COST_FACTOR
        m = self.metrics
        m.dms.clear()
        for state, count in dms.items():
            m.dms.labels(state).set(count)
        for network in sorted({*self.networks, *backlog, *dead}):
            count, oldest_ms = backlog.get(network, (0, 0))
            m.outbox_backlog.labels(network).set(count)
            m.outbox_oldest.labels(network).set(max(0.0, wall - oldest_ms / 1000) if count else 0)
            m.dead_letters.labels(network).set(dead.get(network, 0))


def exposition(registry: CollectorRegistry, accept: str) -> web.Response:
    """The registry in the text format the scraper asked for (Accept header)."""
    encode, content_type = choose_encoder(accept)
    response = web.Response(body=encode(registry))
    response.headers["Content-Type"] = content_type
    return response


def metrics_handler(metrics: Metrics, gauges: DatabaseGauges) -> Handler:
    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            await gauges.refresh()
        except Exception as e:  # the other families are still worth scraping
            log.warning("could not count DMs and the outbox for /metrics: %r", e)
        return exposition(metrics.registry, request.headers.get("Accept", ""))

    return serve
