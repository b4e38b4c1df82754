"""HTTP to the bridge: the token, JSON, errors as exceptions, and bounded retries."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json as jsonlib
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .backend import ROUTES, Call
from .errors import ConnectionFailed, UnexpectedAnswer, api_error

PREFIX = "/_dmbridge/v1"
DEFAULT_PORTS = {"http": 80, "https": 443}
log = logging.getLogger("dmbridge_client")

# Statuses worth sending the same request again for; every call of the client is safe to
# repeat (sends carry their message ID, the rest are idempotent by nature).
WAIT_STATUSES = frozenset({429, 503})
TRANSIENT_STATUSES = frozenset({502, 504})


def api_base(base_url: str) -> str:
    """``http://host:port`` or ``http://host:port/_dmbridge/v1``, as the API's root."""
    base = base_url.rstrip("/")
    return base if base.endswith(PREFIX) else base + PREFIX


def retry_after(resp: aiohttp.ClientResponse, body: Any) -> float | None:
    """Seconds the answer asks to wait: its ``Retry-After`` (seconds or an HTTP date), else
    the body's ``retry_after_ms``; None if it names no time."""
    header = resp.headers.get("Retry-After", "").strip()
    if header.isdigit():
        return float(header)
    if header:
        with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
            when = email.utils.parsedate_to_datetime(header)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
    if isinstance(body, dict) and isinstance(body.get("retry_after_ms"), int):
        return max(0.0, float(body["retry_after_ms"]) / 1000)
    return None


class Transport:
    """The client's calls as HTTP requests to the bridge's listener (the default
    :class:`~dmbridge_client.backend.Backend`); one aiohttp session, opened on first use."""

    def __init__(self, base_url: str, token: str, *, max_retries: int = 5,
                 max_wait: float = 60.0, timeout: float = 90.0,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.base = api_base(base_url)
        self.headers = {"Authorization": f"Bearer {token}"}
        self.max_retries = max_retries
        self.max_wait = max_wait
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    async def call(self, call: Call) -> Any:
        method = ROUTES[call.operation][0]
        headers = {"Content-Type": call.content_type} if call.content_type is not None else None
        return await self.request(method, call.path(), json=call.body, params=dict(call.query)
                                  if call.query is not None else None, data=call.content,
                                  headers=headers, replayable=call.replayable,
                                  time_limit=call.time_limit, parse=call.parse)

    async def download(self, url: str) -> bytes:
        data: bytes = await self.request("GET", url, raw=True)
        return data

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: dict[str, str] | None = None, data: Any = None,
                      headers: dict[str, str] | None = None, replayable: bool = True,
                      time_limit: float | None = None, raw: bool = False,
                      parse: Callable[[Any], Any] | None = None) -> Any:
        """The answer's JSON (``parse``'s result of it, if given); an :class:`APIError` for an
        error answer.

        429 and 503 are sent again after ``Retry-After``, connection errors and 502/504 after a
        growing pause, at most ``max_retries`` times and ``max_wait`` seconds in all; a
        ``replayable=False`` body (a stream) is sent once. ``data`` may be a function that
        gives the body afresh for each attempt. ``path`` may be a whole URL; with ``raw`` the
        answer's bytes are returned; the token is sent only to the bridge's own origin
        (``base_url``'s scheme, host and port). A success answer that is not JSON, or that ``parse``
        cannot read, is an :class:`UnexpectedAnswer`; an answer cut short a connection error.
        """
        url = path if path.startswith(("http://", "https://")) else self.base + path
        # The token goes to the bridge only: a link to another address (a media link starting
        # with the bridge's public address, or whatever an event names) is signed by itself.
        own = self.headers if _origin(url) == _origin(self.base) else {}
        all_headers = own if headers is None else {**own, **headers}
        waited = 0.0
        attempt = 0
        client_timeout = None if time_limit is None else aiohttp.ClientTimeout(total=time_limit)
        while True:
            attempt += 1
            try:
                async with self.session().request(
                        method, url, json=json, params=params,
                        data=data() if callable(data) else data, headers=all_headers,
                        timeout=client_timeout or self.timeout) as resp:
                    if resp.status < 300:
                        content = await resp.read()
                        if raw:
                            return content
                        return _answer(resp, content, parse)
                    body = await _json_or_none(resp)
                    wait = retry_after(resp, body)
                    error = api_error(resp.status, body, resp.headers.get("X-Request-ID"),
                                      wait)
                    pause = pause_before_retry(resp.status, wait, attempt)
            except (aiohttp.ClientError, TimeoutError) as e:
                pause = _backoff(attempt)
                if not replayable or attempt > self.max_retries or waited + pause > self.max_wait:
                    raise ConnectionFailed(
                        f"{method} {url} failed after {attempt} attempt(s): "
                        f"{type(e).__name__}: {e}") from e
                log.info("%s %s: %s; sending it again in %.1f s", method, path,
                         type(e).__name__, pause)
            else:
                if pause is None or not replayable or attempt > self.max_retries \
                        or waited + pause > self.max_wait:
                    raise error
                log.info("%s %s: %s; sending it again in %.1f s", method, path, error.code,
                         pause)
            waited += pause
            await asyncio.sleep(pause)


def pause_before_retry(status: int, wait: float | None, attempt: int) -> float | None:
    """How long to wait before sending again; None: do not. A 429 or 503 waits as long
    as it asks (beyond ``max_wait`` it is raised), else a growing pause."""
    if status in WAIT_STATUSES:
        return _backoff(attempt) if wait is None else wait
    if status in TRANSIENT_STATUSES:
        return _backoff(attempt)
    return None


def _backoff(attempt: int) -> float:
    return min(8.0, 0.25 * 2.0 ** attempt) * random.uniform(0.5, 1.0)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme)


def _answer(resp: aiohttp.ClientResponse, content: bytes,
            parse: Callable[[Any], Any] | None) -> Any:
    try:
        answer = jsonlib.loads(content) if content.strip() else None
        return answer if parse is None else parse(answer)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UnexpectedAnswer(
            resp.status, "", f"{resp.content_type} answer the client cannot read "
            f"({type(e).__name__}: {e}): {content[:200]!r}",
            request_id=resp.headers.get("X-Request-ID")) from e


async def _json_or_none(resp: aiohttp.ClientResponse) -> Any:
    try:
        return await resp.json(content_type=None)
    except ValueError:
        return None
