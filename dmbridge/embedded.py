"""The platform SDK for a program that runs the bridge in its own process.

``client_for(bridge, "sms")`` is a ``dmbridge_client.Client`` for one of the bridge's networks
whose calls are performed by the bridge's own operations (:mod:`dmbridge.api.operations`),
the ones its HTTP API performs: no socket, no HTTP request, no JSON. Every check and guarantee
is the same (the network's token, field rules, idempotency by message ID, quotas, rate limits,
permissions), and a refusal raises the same ``dmbridge_client`` exception as over HTTP. Events
come straight from the bridge's outbox, so ``await client.run()`` works unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

try:
    from dmbridge_client import Client
    from dmbridge_client.backend import Call
    from dmbridge_client.errors import APIError, ConnectionFailed, api_error
    from dmbridge_client.transport import PREFIX, Transport, pause_before_retry
except ImportError:  # the bridge itself runs without the SDK
    raise ImportError("the platform SDK is not installed: pip install ./sdk "
                      "(dmbridge-client)") from None

from . import requestid
from .api.app import as_bridge_error
from .api.operations import OPERATIONS, Input, Operations, authorize, download
from .errors import NotReady, TooLarge

if TYPE_CHECKING:
    from .bridge import Bridge
    from .config import Settings
    from .metrics import Metrics

log = logging.getLogger("dmbridge.embedded")
CHUNK = 65536
# A long poll only waits, and an abandoned upload's file is never used (its caller has
# usually closed the file it reads): a cancelled caller or a stop ends them at once.
INTERRUPTIBLE = frozenset({"pullEvents", "uploadMedia"})
T = TypeVar("T")


def listener_url(settings: Settings) -> str:
    """The loopback address of the bridge's listener, as a URL."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        settings.hostname, settings.hostname)
    if ":" in host and not host.startswith("["):  # an IPv6 literal goes in brackets in a URL
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def client_for(bridge: Bridge, network: str, *, over_http: bool = False,
               **options: Any) -> Client:
    """An SDK client of ``network`` on this bridge; ``options`` go to ``Client``. It may be
    made before the bridge starts: until then its calls are refused as not ready (503, retried).

    Its calls are performed in this process; ``over_http=True`` sends them to the bridge's
    listener instead, as a separate program would.
    """
    settings = bridge.settings
    token = settings.networks.get(network).tokens[0]
    options.setdefault("remote_id_pattern", settings.networks.get(network).remote_id_pattern
                       .pattern)
    url = listener_url(settings)
    if over_http:
        return Client(url, token, network, **options)
    backend = InProcess(lambda: bridge.operations, token, url, metrics=bridge.metrics,
                        max_retries=options.get("max_retries", 5),
                        max_wait=options.get("max_wait", 60.0),
                        timeout=options.get("timeout", 90.0))
    return Client(url, token, network, backend=backend, **options)


class InProcess:
    """A ``dmbridge_client`` backend that performs each call with the bridge's operations.

    Refusals the client would send again over HTTP (429, 502, 503, 504) are performed again
    after the same pauses, within ``max_retries`` and ``max_wait``. The caller waits at most
    ``timeout`` seconds for an answer (a call's ``time_limit`` if it has one), then the call is
    made again as the HTTP client sends a request that got no answer again, and at the end
    raises ``ConnectionFailed``; a begun operation still runs to its end. A link to a file
    that is not the bridge's is fetched over HTTP, as the HTTP client would.
    """

    def __init__(self, operations: Callable[[], Operations], token: str, listener: str, *,
                 max_retries: int = 5, max_wait: float = 60.0, timeout: float = 90.0,
                 metrics: Metrics | None = None) -> None:
        self.operations = operations  # the bridge's, once it is started (else NotReady)
        self.token = token
        self.listener = listener
        self.max_retries = max_retries
        self.max_wait = max_wait
        self.timeout = timeout
        self.metrics = metrics  # calls counted by operation and status, as the listener counts
        self._http: Transport | None = None

    async def call(self, call: Call) -> Any:
        async def once() -> Any:
            answer = await self._perform(call, await _content(call.content))
            return answer if call.parse is None else call.parse(answer)

        return await self._retrying(call.operation, once, call.replayable)

    async def download(self, url: str) -> bytes:
        parts = urlsplit(url)
        _, _, rest = parts.path.partition(PREFIX + "/networks/")
        segments = [unquote(s) for s in rest.split("/")]
        if not rest or len(segments) != 4 or segments[1] != "media":
            if self._http is None:
                self._http = Transport(self.listener, self.token, max_retries=self.max_retries,
                                       max_wait=self.max_wait, timeout=self.timeout)
            return await self._http.download(url)
        network_id, _, server, media_id = segments
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}

        async def fetch() -> bytes:
            ops = self.operations()
            return await download(ops, authorize(ops.settings, network_id, self.token),
                                  server, media_id, query.get("expires"), query.get("sig"))

        async def once() -> bytes:
            async with asyncio.timeout(self.timeout):
                return await self._checked("downloadMedia", fetch)

        return await self._retrying("downloadMedia", once, True)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def _perform(self, call: Call, content: tuple[AsyncIterator[bytes], int | None] | None
                       ) -> dict[str, Any]:
        async def perform() -> dict[str, Any]:
            network = authorize(ops.settings, call.network, self.token)
            ops.charge(call.operation, network)  # before the body, as over HTTP
            if call.body is not None:
                _within_limit(call.body, ops.settings.max_body_bytes)
            return await ops.perform(call.operation, Input(
                network=network, body=call.body or {}, query=call.query or {}, args=call.args,
                content=content[0] if content else None, content_type=call.content_type,
                length=content[1] if content else None), charged=True)

        interruptible = call.operation in INTERRUPTIBLE
        try:
            ops = self.operations()
            done = ops.in_flight.begin(self._checked(call.operation, perform),
                                       interruptible=interruptible)
        except NotReady as e:  # the bridge is not started yet, or is stopping
            self._count(call.operation, e.status, 0.0)
            raise _sdk_error(e, call.operation, requestid.new_id()) from e
        async with asyncio.timeout(call.time_limit or self.timeout):
            if interruptible:
                return await done
            # Begun, it runs to its end even if the caller is cancelled or stops waiting, as
            # the bridge finishes an HTTP request whose client went away: a send is never left
            # half done. A stopping bridge waits for it before it closes what it uses.
            done.add_done_callback(_retrieved)
            return await asyncio.shield(done)

    async def _checked(self, operation: str, perform: Callable[[], Awaitable[T]]) -> T:
        """``perform``'s result; a failure as the SDK exception an HTTP answer gives. The call
        has a request ID, as an HTTP request has: its log lines and its error carry it. Each
        call that ends (not one cancelled) is counted and timed by operation and status."""
        rid = requestid.new_id()
        start = time.monotonic()
        with requestid.scope(rid):
            try:
                answer = await perform()
            except Exception as e:
                error = _sdk_error(e, operation, rid)
                self._count(operation, error.status, time.monotonic() - start)
                raise error from e
        known = OPERATIONS.get(operation)
        self._count(operation, known.status if known else 200, time.monotonic() - start)
        return answer

    def _count(self, operation: str, status: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.in_process_call(operation, status, seconds)

    async def _retrying(self, operation: str, once: Callable[[], Awaitable[T]],
                        replayable: bool) -> T:
        waited, attempt = 0.0, 0
        while True:
            attempt += 1
            try:
                return await once()
            except APIError as error:
                pause = pause_before_retry(error.status, getattr(error, "retry_after", None),
                                           attempt)
                if pause is None or not replayable or attempt > self.max_retries \
                        or waited + pause > self.max_wait:
                    raise
                log.info("%s: %s; performing it again in %.1f s", operation, error.code, pause)
            except TimeoutError as e:  # no answer in time: as the HTTP client's request
                pause = _backoff(attempt)
                if not replayable or attempt > self.max_retries \
                        or waited + pause > self.max_wait:
                    raise ConnectionFailed(
                        f"{operation} (in process) failed after {attempt} attempt(s): no "
                        "answer in time") from e
                log.info("%s: no answer in time; performing it again in %.1f s", operation,
                         pause)
            waited += pause
            await asyncio.sleep(pause)


def _backoff(attempt: int) -> float:
    """The HTTP client's pause before it sends a request that got no answer again."""
    pause = pause_before_retry(504, None, attempt)
    assert pause is not None
    return pause


def _sdk_error(e: Exception, operation: str, rid: str) -> APIError:
    """The SDK exception an HTTP answer to the failure ``e`` gives."""
    error = as_bridge_error(e, f"{operation} (in process)")
    return api_error(error.status, error.to_json(), rid, getattr(error, "retry_after", None))


def _retrieved(done: asyncio.Future[Any]) -> None:
    """The outcome of an operation whose caller was cancelled is in the log already (an
    internal error) or was the caller's to see; it is not reported again."""
    if not done.cancelled():
        done.exception()


def _within_limit(body: dict[str, Any], limit: int) -> None:
    """The body's size as the HTTP client would send it (JSON, aiohttp's defaults) kept to
    the API's limit; measured only when a quick upper bound says it could exceed it."""
    if _bound(body) <= limit:
        return
    size = len(json.dumps(body).encode())
    if size > limit:
        raise TooLarge(f"the request body is {size} bytes; the limit is {limit}")


def _bound(value: Any) -> int:
    """At least the length of ``value``'s JSON: a character takes 12 bytes at most (an
    escaped surrogate pair), a float or constant 32."""
    if isinstance(value, str):
        return 12 * len(value) + 2
    if isinstance(value, dict):
        return 2 + sum(_bound(str(k)) + _bound(v) + 4 for k, v in value.items())
    if isinstance(value, list | tuple):
        return 2 + sum(_bound(v) + 2 for v in value)
    if isinstance(value, int):
        return len(str(value)) + 1
    return 32


async def _content(content: Any) -> tuple[AsyncIterator[bytes], int | None] | None:
    """An upload's bytes as the operation reads them, and their length when known: bytes, a
    function giving bytes or a file afresh (called beside the event loop: it may open a file),
    a file, or an async stream. A file a function gave is closed once read."""
    if content is None:
        return None
    made = callable(content)
    source = await asyncio.to_thread(content) if made else content
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return _slices(data), len(data)
    if hasattr(source, "read"):
        return _file(source, close=made), None
    return _stream(source), None


async def _slices(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start:start + CHUNK]


async def _file(source: Any, *, close: bool) -> AsyncIterator[bytes]:
    """The file read in pieces beside the event loop (reading a disk may block)."""
    try:
        while chunk := await asyncio.to_thread(source.read, CHUNK):
            yield bytes(chunk)
    finally:
        if close:
            source.close()


async def _stream(source: Any) -> AsyncIterator[bytes]:
    async for chunk in source:
        yield bytes(chunk)
