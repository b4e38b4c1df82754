"""Request IDs: every request to the listener gets one, and every log line it causes says it.

The ID lives in a context variable, set for the duration of the request; tasks the request
starts inherit it (asyncio copies the context into them), so their lines carry it too.
:class:`RequestIdFilter` puts it on each log record (as ``record.request_id``) for the
formatters in :mod:`dmbridge.logformat`. A platform may send its own ``X-Request-ID``; it is kept
when it is a plain token, and every answer carries the ID in the same header.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any

from aiohttp import web

HEADER = "X-Request-ID"
# What an incoming ID may look like: it is written into log lines as it is.
_VALID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_TXN_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")
HOMESERVER_PREFIX = "/_matrix/app/"

_current: ContextVar[str | None] = ContextVar("dmbridge_request_id", default=None)
REQUEST_ID = web.RequestKey("request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def current() -> str | None:
    """The ID of the request being handled, or None outside requests."""
    return _current.get()


@contextlib.contextmanager
def scope(rid: str) -> Iterator[None]:
    """Within this block, log lines carry ``rid`` (a call made without HTTP)."""
    token = _current.set(rid)
    try:
        yield
    finally:
        _current.reset(token)


def new_id(prefix: str = "req") -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def id_for(request: web.Request) -> str:
    """The platform's X-Request-ID if it is a plain token; otherwise a fresh one. The
    homeserver's transactions get ``txn-<its txnId>-<random>``, other calls from it ``hs-...``."""
    given = request.headers.get(HEADER, "")
    if _VALID.fullmatch(given):
        return given
    txn = request.match_info.get("transaction_id")
    if txn is not None:
        return f"txn-{txn}-{secrets.token_hex(3)}" if _TXN_ID.fullmatch(txn) else new_id("txn")
    if request.path.startswith(HOMESERVER_PREFIX):
        return new_id("hs")
    return new_id()


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: the request's ID, for its log lines and its answer."""
    rid = id_for(request)
    request[REQUEST_ID] = rid
    token = _current.set(rid)
    try:
        return await handler(request)
    finally:
        _current.reset(token)


async def echo_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the answer says its request's ID (streamed answers too)."""
    rid = request.get(REQUEST_ID) if isinstance(request, web.Request) else None
    if rid is not None:
        response.headers[HEADER] = rid


def install(app: web.Application) -> None:
    """On the root application: before every other middleware, so all it logs has the ID."""
    app.middlewares.insert(0, request_id_middleware)
    app.on_response_prepare.append(echo_request_id)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (None outside requests) to every record a handler writes.

    A summary of suppressed repeats (:mod:`dmbridge.logfilter`) belongs to no request.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = None if getattr(record, "repeat_summary", False) else _current.get()
        return True


def tag(record: Any) -> str | None:
    """The record's request ID, if it has one."""
    rid = getattr(record, "request_id", None)
    return rid if isinstance(rid, str) else None
