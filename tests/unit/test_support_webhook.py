"""The webhook receiver the delivery tests rely on: signatures, failures, going offline."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.webhook import WebhookReceiver, signed_headers, verify_signature

SECRET = "s3cret"


@pytest.fixture
async def rx() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(SECRET) as receiver:
        yield receiver


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, payload: object, *,
               secret: str = SECRET, timestamp: int | None = None,
               key: str = "k1") -> aiohttp.ClientResponse:
    body = json.dumps(payload).encode()
    headers = signed_headers(secret, body, timestamp=timestamp, idempotency_key=key)
    async with http.post(url, data=body, headers=headers) as resp:
        await resp.read()
        return resp


def test_verify_signature() -> None:
    body = b'{"a": 1}'
    headers = signed_headers(SECRET, body, timestamp=1_000_000)
    ts, sig = headers["X-Dmbridge-Timestamp"], headers["X-Dmbridge-Signature"]
    assert verify_signature(SECRET, ts, sig, body, now=1_000_000)
    assert verify_signature(SECRET, ts, sig, body, now=1_000_300)
    assert not verify_signature(SECRET, ts, sig, body, now=1_000_301)  # too old
    assert not verify_signature(SECRET, ts, sig, body, now=999_699)  # from the future
    assert not verify_signature("other", ts, sig, body, now=1_000_000)
    assert not verify_signature(SECRET, ts, sig, body + b" ", now=1_000_000)
    assert not verify_signature(SECRET, "1000001", sig, body, now=1_000_000)
    assert not verify_signature(SECRET, " 1000000", sig, body, now=1_000_000)
    assert not verify_signature(SECRET, ts, sig.removeprefix("sha256="), body, now=1_000_000)
    assert not verify_signature(SECRET, ts, "sha256=é", body, now=1_000_000)  # no TypeError


async def test_records_signed_delivery(rx: WebhookReceiver,
                                       http: aiohttp.ClientSession) -> None:
    resp = await post(http, rx.url, {"text": "hi"}, key="abc")
    assert resp.status == 200
    [d] = await rx.wait_accepted(1, timeout=5)
    assert d.signature_ok and d.json == {"text": "hi"} and d.idempotency_key == "abc"
    assert d.headers["idempotency-key"] == "abc"  # case-insensitive
    assert abs(d.received_at - time.time()) < 5


async def test_bad_and_old_signatures_are_flagged(rx: WebhookReceiver,
                                                  http: aiohttp.ClientSession) -> None:
    await post(http, rx.url, {"n": 1}, secret="wrong")
    await post(http, rx.url, {"n": 2}, timestamp=int(time.time()) - 301)
    async with http.post(rx.url, data=b"not json") as resp:  # no signature headers at all
        assert resp.status == 200
    deliveries = await rx.wait_accepted(3, timeout=5)
    assert [d.signature_ok for d in deliveries] == [False, False, False]
    assert deliveries[2].json is None and deliveries[2].idempotency_key is None


async def test_down_with_retry_after(rx: WebhookReceiver, http: aiohttp.ClientSession) -> None:
    rx.down(429, retry_after="7")
    resp = await post(http, rx.url, {"n": 1})
    assert resp.status == 429 and resp.headers["Retry-After"] == "7"
    rx.down()
    resp = await post(http, rx.url, {"n": 2})
    assert resp.status == 503 and "Retry-After" not in resp.headers
    rx.up()
    assert (await post(http, rx.url, {"n": 3})).status == 200
    assert [d.status for d in rx.attempts] == [429, 503, 200]
    assert [d.json["n"] for d in rx.accepted] == [3]


async def test_stall_holds_until_up(rx: WebhookReceiver, http: aiohttp.ClientSession) -> None:
    rx.stall()
    pending = asyncio.create_task(post(http, rx.url, {"n": 1}))
    await rx.wait_attempts(1, timeout=5)
    await asyncio.sleep(0.2)
    assert not pending.done() and len(rx.stalled) == 1 and rx.accepted == []
    rx.up()
    assert (await asyncio.wait_for(pending, 5)).status == 200
    assert rx.accepted == [] and rx.stalled[0].status == 200


async def test_stop_refuses_and_start_reuses_the_port(rx: WebhookReceiver,
                                                      http: aiohttp.ClientSession) -> None:
    port = rx.port
    rx.stall()
    held = asyncio.create_task(post(http, rx.url, {"n": 1}))
    await rx.wait_attempts(1, timeout=5)
    await asyncio.wait_for(rx.stop(), 5)  # stalled requests do not hold the shutdown up
    await asyncio.gather(held, return_exceptions=True)
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(http, rx.url, {"n": 2})
    rx.up()
    await rx.start()
    assert rx.port == port
    assert (await post(http, rx.url, {"n": 3})).status == 200
    assert [d.json["n"] for d in rx.accepted] == [3]


async def test_fixed_port(http: aiohttp.ClientSession) -> None:
    async with WebhookReceiver(SECRET) as first:
        port = first.port
    async with WebhookReceiver(SECRET, port=port) as second:
        assert second.url == f"http://127.0.0.1:{port}/hook"
        assert (await post(http, second.url, {})).status == 200


async def test_wait_accepted_timeout_says_what_arrived(rx: WebhookReceiver,
                                                       http: aiohttp.ClientSession) -> None:
    rx.down(500)
    await post(http, rx.url, {"n": 1}, key="first")
    with pytest.raises(AssertionError) as err:
        await rx.wait_accepted(1, timeout=0.3)
    message = str(err.value)
    assert "expected 1 accepted" in message and "got 0" in message
    assert "status=500" in message and "'first'" in message
