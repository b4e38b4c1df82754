"""A platform's webhook endpoint, as the bridge delivers Matrix replies out to it.

``WebhookReceiver`` is a small aiohttp server on 127.0.0.1 that records every POST, checks its
signature, and can be switched while running between answering (``up``), failing (``down``),
holding requests open (``stall``) and refusing connections altogether (``stop``/``start``).

The signature scheme the bridge uses::

    X-Dmbridge-Timestamp: <unix seconds>
    X-Dmbridge-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}." + raw body)>
    Idempotency-Key: <string>
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict

from dmbridge.localhs import free_port

TIMESTAMP_HEADER = "X-Dmbridge-Timestamp"
SIGNATURE_HEADER = "X-Dmbridge-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def _digest(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: str, timestamp: str, signature: str, body: bytes, *,
                     now: float | None = None, window: int = 300) -> bool:
    """Whether ``signature`` signs ``body`` at ``timestamp``, within ``window`` s of ``now``."""
    # The scheme says a plain integer; int() alone would also take " 12", "+12" or "1_2".
    if not (timestamp.isascii() and timestamp.isdigit()):
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > window:
        return False
    # Compare bytes: compare_digest raises TypeError on non-ASCII str, and headers can be any.
    expected = _digest(secret, timestamp, body).encode()
    return hmac.compare_digest(expected, signature.encode("utf-8", "replace"))


def signed_headers(secret: str, body: bytes, *, timestamp: int | None = None,
                   idempotency_key: str | None = None) -> dict[str, str]:
    """The headers the bridge sends with ``body``: for self-tests and fake senders."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: ts,
        SIGNATURE_HEADER: _digest(secret, ts, body),
    }
    if idempotency_key is not None:
        headers[IDEMPOTENCY_HEADER] = idempotency_key
    return headers


@dataclass
class Delivery:
    """One POST as it arrived."""

    body: bytes
    json: Any  # the parsed body, None if it is not JSON
    headers: CIMultiDict[str]  # case-insensitive: headers["idempotency-key"] works
    received_at: float  # time.time(), comparable with the signed timestamp
    signature_ok: bool
    idempotency_key: str | None
    status: int | None = None  # what the receiver answered; None while stalled

    def describe(self) -> str:
        body = self.body[:200].decode(errors="replace")
        return (f"status={self.status} key={self.idempotency_key!r} "
                f"signature_ok={self.signature_ok} body={body}")


Mode = Literal["up", "down", "stall"]


class WebhookReceiver:
    """``async with WebhookReceiver(secret) as rx:`` then point the bridge at ``rx.url``."""

    def __init__(self, secret: str, *, port: int | None = None, path: str = "/hook") -> None:
        self.secret = secret
        self.port = port or free_port()
        self.path = path
        self.attempts: list[Delivery] = []  # every POST, whatever it was answered
        self.accepted: list[Delivery] = []  # the ones answered 2xx, in arrival order
        self.stalled: list[Delivery] = []  # the ones held open by stall()
        self._mode: Mode = "up"
        self._down_status = 503
        self._retry_after: str | None = None
        # Stalled handlers wait on the event that was current when they arrived.
        self._release = asyncio.Event()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    # -- behaviour, switchable at any time; it applies to requests that arrive afterwards --

    def up(self) -> None:
        """Answer 200 ``{}``; also releases every stalled request."""
        self._mode = "up"
        self._release.set()

    def down(self, status: int = 503, retry_after: str | None = None) -> None:
        """Answer ``status`` (and ``Retry-After: retry_after`` if given)."""
        self._mode, self._down_status, self._retry_after = "down", status, retry_after

    def stall(self) -> None:
        """Hold requests open without answering until ``up()`` or ``stop()``.

        Released requests are then answered 200 but never count as accepted: the test is
        expected to have killed the bridge meanwhile, so no one is listening for the answer.
        """
        self._mode = "stall"
        if self._release.is_set():
            self._release = asyncio.Event()

    # -- lifecycle --

    async def start(self) -> None:
        """Listen on ``self.port`` (again, after ``stop()``)."""
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        # Stalled handlers are released in stop(), so a short grace period is plenty.
        runner = web.AppRunner(app, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        """Go offline: connections are refused until ``start()``. Keeps what was recorded."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._release.set()
        await runner.cleanup()
        self._release = asyncio.Event()  # so a stall() still holds after a restart

    async def __aenter__(self) -> WebhookReceiver:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # -- waiting --

    async def wait_accepted(self, n: int, timeout: float = 30.0) -> list[Delivery]:
        """The first ``n`` accepted deliveries, once they have arrived."""
        return await self._wait(lambda: self.accepted, n, "accepted", timeout)

    async def wait_attempts(self, n: int, timeout: float = 30.0) -> list[Delivery]:
        """The first ``n`` attempts (answered anyhow, or stalled), once they have arrived."""
        return await self._wait(lambda: self.attempts, n, "attempts", timeout)

    async def _wait(self, seen: Callable[[], Sequence[Delivery]], n: int, what: str,
                    timeout: float) -> list[Delivery]:
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: len(seen()) >= n)
        except TimeoutError:
            raise AssertionError(
                f"webhook {self.url}: expected {n} {what} within {timeout} s, "
                f"got {len(seen())}; all {len(self.attempts)} attempts:\n" + self.summary()
            ) from None
        return list(seen()[:n])

    def summary(self) -> str:
        return "\n".join(f"  {i}: {d.describe()}" for i, d in enumerate(self.attempts)) or (
            "  (none)")

    # -- the endpoint --

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        delivery = self._record(request, body)
        # The behaviour as it was when the request arrived.
        mode, release = self._mode, self._release
        status, retry_after = self._down_status, self._retry_after
        delivery.status = {"up": 200, "down": status, "stall": None}[mode]
        async with self._changed:
            self.attempts.append(delivery)
            if mode == "up":
                self.accepted.append(delivery)
            elif mode == "stall":
                self.stalled.append(delivery)
            self._changed.notify_all()
        if mode == "down":
            headers = {"Retry-After": retry_after} if retry_after is not None else None
            return web.json_response({"error": "down for the test"}, status=status,
                                     headers=headers)
        if mode == "stall":
            await release.wait()
            delivery.status = 200  # answered, but not accepted: see stall()
        return web.json_response({})

    def _record(self, request: web.Request, body: bytes) -> Delivery:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        headers = CIMultiDict(request.headers)
        timestamp = headers.get(TIMESTAMP_HEADER)
        signature = headers.get(SIGNATURE_HEADER)
        ok = (timestamp is not None and signature is not None
              and verify_signature(self.secret, timestamp, signature, body))
        return Delivery(body=body, json=parsed, headers=headers, received_at=time.time(),
                        signature_ok=ok, idempotency_key=headers.get(IDEMPOTENCY_HEADER))
