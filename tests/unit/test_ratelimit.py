"""Token buckets, quotas, and the rate-limit middleware against a fake homeserver on port 0."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from mautrix.api import HTTPAPI, Method
from mautrix.api import Path as MatrixPath

from dmbridge.api.app import error_boundary
from dmbridge.errors import QuotaExceeded, RateLimited
from dmbridge.homeserver import Homeserver, RequestLog
from dmbridge.networks import Network
from dmbridge.quotas import Quotas, QuotaSettings
from dmbridge.ratelimit import (
    HomeserverLimits,
    Pacing,
    default_budget,
    remaining,
    request_budget,
)
from dmbridge.tokenbucket import TokenBucket
from tests.support.settings import make_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    for _ in range(3):
        assert bucket.delay() == 0
        bucket.take()
    assert bucket.delay() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.delay() == 0


def test_bucket_takers_queue_one_after_another() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    waits = []
    for _ in range(4):
        waits.append(bucket.delay())
        bucket.take()
    assert waits == pytest.approx([0, 1, 2, 3])


def test_bucket_refills_to_the_burst_only() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=2, clock=clock)
    clock.now += 3600
    for _ in range(2):
        bucket.take()
    assert bucket.delay() == pytest.approx(0.1)
    bucket.give_back()
    assert bucket.delay() == 0


def _network(**quotas: Any) -> Network:
    settings = make_settings(Path(tempfile.mkdtemp(prefix="dmbridge-q-")),
                             homeserver_url="http://127.0.0.1:1", domain="localhost", port=2,
                             db_url="sqlite:///unused.db")
    network = settings.networks.get("sms")
    return replace(network, quotas=QuotaSettings(**quotas))


def test_message_quota_says_when_to_come_back() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    network = _network(messages_per_second=2, message_burst=2, new_dms_per_hour=0)
    quotas.message(network)
    quotas.message(network)
    with pytest.raises(QuotaExceeded) as e:
        quotas.message(network)
    assert e.value.status == 429 and e.value.errcode == "DMBRIDGE_QUOTA_EXCEEDED"
    assert e.value.retry_after == pytest.approx(0.5)
    assert e.value.headers() == {"Retry-After": "1"}
    clock.now += 0.5
    quotas.message(network)


def test_new_dm_quota_is_given_back_when_no_room_was_made() -> None:
    quotas = Quotas(Clock())
    network = _network(new_dms_per_hour=1)
    give_back = quotas.new_dm(network)
    with pytest.raises(QuotaExceeded) as e:
        quotas.new_dm(network)
    assert e.value.retry_after == pytest.approx(3600)
    give_back()
    quotas.new_dm(network)


def test_zero_turns_quotas_off() -> None:
    quotas = Quotas(Clock())
    network = _network(messages_per_second=0, new_dms_per_hour=0)
    for _ in range(10_000):
        quotas.message(network)
        quotas.new_dm(network)


# --- the middleware, against a fake upstream ---------------------------------------------------

class FakeHomeserver:
    """Answers 429 (with ``retry_after_ms``) ``limited`` times, then 200; records bodies."""

    def __init__(self, limited: int, retry_after_ms: int | None = 100,
                 header: str | None = None) -> None:
        self.limited = limited
        self.retry_after_ms = retry_after_ms
        self.header = header
        self.bodies: list[bytes] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        if self.limited > 0:
            self.limited -= 1
            body: dict[str, Any] = {"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests"}
            if self.retry_after_ms is not None:
                body["retry_after_ms"] = self.retry_after_ms
            headers = {"Retry-After": self.header} if self.header else None
            return web.json_response(body, status=429, headers=headers)
        return web.json_response({"event_id": "$ok", "content_uri": "mxc://x/y"})


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[FakeHomeserver], Awaitable[str]]]:
    servers: list[TestServer] = []

    async def start(fake: FakeHomeserver) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", fake.handle)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def limits() -> AsyncIterator[HomeserverLimits]:
    limits = HomeserverLimits(RequestLog(), background_wait=5)
    yield limits
    limits.close()


async def test_send_waits_out_429_then_lands(serve: Any, limits: HomeserverLimits) -> None:
    fake = FakeHomeserver(limited=2, retry_after_ms=50)
    hs = Homeserver(await serve(fake), "token", [limits.middleware])
    try:
        event_id = await hs.send_event("@g:x", "!r", "m.room.message", "txn1",  # type: ignore
                                       {"body": "hi"})
    finally:
        await hs.close()
    assert event_id == "$ok"
    assert len(fake.bodies) == 3 and len(set(fake.bodies)) == 1
    assert limits.requests.total == 3  # every request the homeserver saw, retries included


async def test_wait_longer_than_the_budget_is_rate_limited(serve: Any,
                                                          limits: HomeserverLimits) -> None:
    fake = FakeHomeserver(limited=1, retry_after_ms=30_000)
    hs = Homeserver(await serve(fake), "token", [limits.middleware])
    try:
        with request_budget(1.0), pytest.raises(RateLimited) as e:
            await hs.send_event("@g:x", "!r", "m.room.message", "t", {})  # type: ignore
        # The next request of the same kind does not even ask: it knows it would wait.
        with request_budget(1.0), pytest.raises(RateLimited):
            await hs.send_event("@g:x", "!r", "m.room.message", "t2", {})  # type: ignore
    finally:
        await hs.close()
    assert e.value.status == 429 and e.value.errcode == "M_LIMIT_EXCEEDED"
    assert 29 < e.value.retry_after <= 30
    assert e.value.headers() == {"Retry-After": "30"}
    assert e.value.to_json()["retry_after_ms"] == 30_000
    assert len(fake.bodies) == 1


async def test_retry_after_header_when_the_body_says_nothing(serve: Any,
                                                             limits: HomeserverLimits) -> None:
    fake = FakeHomeserver(limited=1, retry_after_ms=None, header="7")
    hs = Homeserver(await serve(fake), "token", [limits.middleware])
    try:
        with request_budget(0.5), pytest.raises(RateLimited) as e:
            await hs.send_event("@g:x", "!r", "m.room.message", "t", {})  # type: ignore
    finally:
        await hs.close()
    assert 6 < e.value.retry_after <= 7


async def test_other_users_are_not_held_back(serve: Any, limits: HomeserverLimits) -> None:
    fake = FakeHomeserver(limited=1, retry_after_ms=30_000)
    hs = Homeserver(await serve(fake), "token", [limits.middleware])
    try:
        with request_budget(0.5), pytest.raises(RateLimited):
            await hs.send_event("@a:x", "!r", "m.room.message", "t", {})  # type: ignore
        assert await hs.send_event("@b:x", "!r", "m.room.message", "t", {}) == "$ok"  # type: ignore
    finally:
        await hs.close()


async def test_mautrix_requests_retry_once_per_429(serve: Any, limits: HomeserverLimits) -> None:
    """mautrix's own retries (502/503/504 only) do not multiply the middleware's."""
    fake = FakeHomeserver(limited=3, retry_after_ms=20)
    url = await serve(fake)
    async with aiohttp.ClientSession(middlewares=[limits.middleware]) as session:
        api = HTTPAPI(base_url=url, token="token", client_session=session,
                      default_retry_count=3)
        result = await api.request(Method.POST, MatrixPath.v3.createRoom, content={"preset": "x"})
    assert result["event_id"] == "$ok"
    assert len(fake.bodies) == 4


async def test_upload_from_a_file_is_sent_again_whole(serve: Any,
                                                      limits: HomeserverLimits) -> None:
    fake = FakeHomeserver(limited=1, retry_after_ms=20)
    hs = Homeserver(await serve(fake), "token", [limits.middleware])
    data = b"\x89PNG" + bytes(range(256)) * 1000
    try:
        with tempfile.TemporaryFile() as spool:
            spool.write(data)
            spool.seek(0)
            assert await hs.upload(spool, "image/png", "a.png", len(data)) == "mxc://x/y"
    finally:
        await hs.close()
    assert fake.bodies == [data, data]


async def test_a_streamed_body_is_not_replayed(serve: Any, limits: HomeserverLimits) -> None:
    fake = FakeHomeserver(limited=1, retry_after_ms=20)
    url = await serve(fake)

    async def stream() -> AsyncIterator[bytes]:
        yield b"part one, "
        yield b"part two"

    async with aiohttp.ClientSession(middlewares=[limits.middleware]) as session:
        with pytest.raises(RateLimited) as e:
            await session.post(f"{url}/_matrix/media/v3/upload", data=stream())
    assert "cannot be sent again" in e.value.message
    assert fake.bodies == [b"part one, part two"]


async def test_a_storm_is_one_log_line(serve: Any, limits: HomeserverLimits,
                                       caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeHomeserver(limited=20, retry_after_ms=1)
    hs = Homeserver(await serve(fake), "token", [limits.middleware])
    caplog.set_level(logging.WARNING, "dmbridge.ratelimit")
    try:
        await asyncio.gather(*(
            hs.send_event(f"@g{i}:x", "!r", "m.room.message", "t", {})  # type: ignore
            for i in range(10)
        ))
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1, lines
        assert "rate-limits PUT /_matrix/client/v3/rooms/{id}/send/{type}/{txn}" in lines[0]
        assert "waiting 0.1 s" in lines[0] or "waiting 0.0 s" in lines[0]
        limits.close()
    finally:
        await hs.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "19 more time(s)" in lines[1], lines


async def test_the_error_boundary_sets_retry_after() -> None:
    async def handler(_: web.Request) -> web.Response:
        raise RateLimited("the homeserver rate-limits POST /createRoom", 2.2)

    app = web.Application(middlewares=[error_boundary])
    app.router.add_get("/x", handler)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session, session.get(server.make_url("/x")) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "3"
            assert await r.json() == {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 2200,
                                      "error": "the homeserver rate-limits POST /createRoom"}
    finally:
        await server.close()


async def test_room_creation_queues_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    network = _network(new_dms_per_hour=100)
    pacing = Pacing(rate=20, burst=1, quotas=Quotas(), background_wait=5)
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(seconds)

    monkeypatch.setattr("dmbridge.ratelimit.asyncio.sleep", sleep)
    for _ in range(3):
        with request_budget(1.0):
            async with pacing.new_room(network):
                pass
    assert len(waits) == 2 and all(0 < w <= 0.05 for w in waits)  # they waited their turn
    monkeypatch.undo()
    with request_budget(0.0), pytest.raises(RateLimited) as e:
        async with pacing.new_room(network):
            pass
    assert e.value.errcode == "M_LIMIT_EXCEEDED" and 0 < e.value.retry_after <= 0.05


async def test_a_failed_room_creation_gives_the_quota_back() -> None:
    network = _network(new_dms_per_hour=1)
    pacing = Pacing(rate=100, burst=10, quotas=Quotas(), background_wait=5)
    with pytest.raises(RuntimeError):
        async with pacing.new_room(network):
            raise RuntimeError("createRoom failed")
    async with pacing.new_room(network):
        pass
    with pytest.raises(QuotaExceeded):
        async with pacing.new_room(network):
            pass


def test_a_default_budget_applies_only_outside_a_request() -> None:
    with default_budget(5.0):
        assert 4.0 < remaining(60.0) <= 5.0  # in-process caller: the default budget
    with request_budget(1.0), default_budget(5.0):
        assert remaining(60.0) <= 1.0  # an API request keeps its own
    assert remaining(60.0) == 60.0
