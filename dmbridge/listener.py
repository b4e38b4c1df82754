"""The one HTTP listener (platform API and homeserver transactions): bounded in time and count.

aiohttp closes a keep-alive connection that sends no further request within
``keepalive_timeout`` and bounds header sizes. It has no cap on open connections and no bound on
how long a request's headers or body may take to arrive; those are written here:

- a cap on open connections, below the process's file-descriptor limit: when it is reached,
  the connection idle the longest (no request in flight) is closed so the new one is served;
- a header timer: a client must send a request's headers in time, counted from when it
  connects or begins its next request (aiohttp's keep-alive timer bounds the wait between
  requests: the idle timeout);
- a body watch: a request body must keep flowing (stall) and end in time (overall), or the
  request is answered 408 and the connection closed.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.streams import StreamReader

from .errors import BridgeError

log = logging.getLogger("dmbridge.listener")

# The listen backlog; asyncio also accepts up to this many connections at a time, and a burst
# of accepts runs up to two such batches ahead of the cap closing connections (measured).
BACKLOG = 128
# aiohttp's default (8190 bytes) is shorter than the API's longest valid URL: a DELETE with a
# 1000-character reason and a 255-character sender and message ID, each character
# percent-encoded as up to 12 bytes.
MAX_REQUEST_LINE = 32 * 1024
# Descriptors kept back from the cap: that burst, the outgoing HTTP pools (mautrix's and the
# homeserver client's, 100 connections each), the database, webhooks, files and the log.
MIN_FD_RESERVE = 2 * BACKLOG + 256
MIN_CONNECTIONS = 16
UNLIMITED_NOFILE = 65536  # what "unlimited" counts as when deriving the cap


@dataclass(frozen=True)
class ListenerSettings:
    """Timeouts and bounds of the listener (config block ``appservice.listener``)."""

    idle_timeout: float = 180.0
    """Seconds a keep-alive connection may wait for its next request. Longer than Synapse keeps
    idle connections (120 s), so it closes them first and never sends on one being closed."""
    header_timeout: float = 10.0
    """Seconds a client has to send a request's headers, from connecting or from beginning its
    next request."""
    body_stall_timeout: float = 30.0
    """Seconds a request body may pause between two pieces before the request is dropped."""
    body_timeout: float = 600.0
    """Seconds a whole request body (the largest upload included) may take to arrive."""
    max_connections: int = 0
    """Open connections at most; 0 derives it from the file-descriptor limit."""
    max_uploads_per_network: int = 4
    """Uploads (POST .../media) one network may have in progress at once."""


def fd_limit() -> int:
    """The process's soft RLIMIT_NOFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNLIMITED_NOFILE if soft == resource.RLIM_INFINITY else soft


def connection_cap(configured: int, nofile: int) -> int:
    """The connection cap: what the descriptor limit leaves room for, or less if configured."""
    room = max(MIN_CONNECTIONS, nofile - max(MIN_FD_RESERVE, nofile // 4))
    if configured <= 0:
        return room
    if configured > room:
        log.warning("appservice.listener.max_connections is %d, but the file-descriptor limit "
                    "(%d) leaves room for %d; using %d (raise `ulimit -n` for more)",
                    configured, nofile, room, room)
        return room
    return configured


class BodyTimeout(BridgeError, TimeoutError):
    """The request body stalled or took too long. A TimeoutError too, so aiohttp's lingering
    read of an unread body treats it as the end of the connection, quietly."""

    status = 408
    errcode = "DMBRIDGE_BODY_TIMEOUT"


class Connection(Protocol):
    """What the connection table needs to know of a connection."""

    @property
    def busy(self) -> bool: ...

    def close_for(self, reason: str) -> None: ...


class ConnectionTable:
    """Open connections, least recently active first; chooses what to close at the cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: OrderedDict[Connection, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, conn: Connection) -> list[Connection]:
        """Record a new connection; returns those to close to stay at the cap.

        The least recently active idle connections go first; when every other connection has a
        request in flight, the new one is refused (it is the one returned).
        """
        self._open[conn] = None
        over = len(self._open) - self.cap
        if over <= 0:
            return []
        victims: list[Connection] = []
        for other in self._open:
            if len(victims) == over:
                break
            if other is not conn and not other.busy:
                victims.append(other)
        if len(victims) < over:
            victims.append(conn)
        for victim in victims:
            del self._open[victim]
        return victims

    def active(self, conn: Connection) -> None:
        """A request was answered on this connection: it is the most recently active now."""
        if conn in self._open:
            self._open.move_to_end(conn)

    def closed(self, conn: Connection) -> None:
        self._open.pop(conn, None)


class ListenerConnection(web.RequestHandler):
    """aiohttp's connection handler, reporting its state to the :class:`Listener`."""

    def __init__(self, listener: Listener, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, loop=listener.loop, **kwargs)
        self.listener = listener
        self.busy = False
        self.answered = 0
        self.received = False
        self.close_reason: str | None = None
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.listener.opened(self)
        if self.close_reason is None:  # the first request's headers are due from now
            self._start_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.close_reason = self.close_reason or "lost"
        self._stop_header_timer()
        self.listener.table.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data:
            self.received = True
            if not self.busy and self._header_timer is None and self.close_reason is None:
                self._start_header_timer()  # the next request has begun
        super().data_received(data)

    def _start_header_timer(self) -> None:
        self._header_timer = self.listener.loop.call_later(
            self.listener.settings.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.busy:
            return
        timeout = self.listener.settings.header_timeout
        if self.received:
            self.listener.warn("closed a connection from %s: no complete request headers "
                               "within %s s (appservice.listener.header_timeout)",
                               self.peername, timeout)
        else:
            self.listener.warn("closed a connection from %s that sent nothing within %s s "
                               "(appservice.listener.header_timeout)", self.peername, timeout)
        self.close_for("headers")

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def request_started(self) -> None:
        self.busy = True
        self._stop_header_timer()

    def log_access(self, request: web.BaseRequest, response: web.StreamResponse,
                   time: float | None) -> None:
        # aiohttp calls this once an answer is written, on every path: the request is done.
        super().log_access(request, response, time)
        if self.busy:
            self.busy = False
            self.answered += 1
            self.listener.table.active(self)

    def close_for(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        self.force_close()

    def force_close(self) -> None:
        # aiohttp's keep-alive timer closes an idle connection through here, unannounced.
        if self.close_reason is None and not self.busy and self.transport is not None and (
                not self.listener.stopping):
            self.close_reason = "idle"
            log.debug("closed a keep-alive connection from %s, idle after %d requests",
                      self.peername, self.answered)
        super().force_close()


class BodyWatch:
    """Fails a request's body with :class:`BodyTimeout` when it stalls or takes too long."""

    def __init__(self, loop: asyncio.AbstractEventLoop, body: StreamReader, *, stall: float,
                 total: float, on_timeout: Callable[[str], None]) -> None:
        self._loop, self._body, self._stall, self._total = loop, body, stall, total
        self._on_timeout = on_timeout
        now = loop.time()
        self._deadline = now + total
        self._seen, self._last = body.total_bytes, now
        self._handle: asyncio.TimerHandle | None = loop.call_at(
            min(now + stall, self._deadline), self._check)

    def _check(self) -> None:
        self._handle = None
        if self._body.is_eof() or self._body.exception() is not None:
            return
        now = self._loop.time()
        if self._body.total_bytes != self._seen:
            self._seen, self._last = self._body.total_bytes, now
        if now >= self._deadline:
            self._fail(f"the request body did not arrive within {self._total:.0f} s")
        elif now - self._last >= self._stall:
            self._fail(f"the request body stalled: nothing arrived for {self._stall:.0f} s")
        else:
            self._handle = self._loop.call_at(min(self._last + self._stall, self._deadline),
                                              self._check)

    def _fail(self, message: str) -> None:
        self._on_timeout(message)
        self._body.set_exception(BodyTimeout(message))

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Listener:
    """The listening socket and its connections: capped, timed, and logged sparingly."""

    def __init__(self, settings: ListenerSettings, nofile: int | None = None) -> None:
        self.settings = settings
        self.nofile = fd_limit() if nofile is None else nofile
        self.table = ConnectionTable(connection_cap(settings.max_connections, self.nofile))
        self.stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._site: ListenerSite | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the listener is not started")
        return self._loop

    @property
    def max_connections(self) -> int:
        return self.table.cap

    def install(self, app: web.Application) -> None:
        """Add the per-request part (busy marking, body watch) to the root application."""
        app.middlewares.append(self._middleware())

    async def start(self, runner: web.AppRunner, host: str, port: int) -> None:
        """Listen on host:port; ``runner`` must be set up (it stops the site on cleanup)."""
        self._loop = asyncio.get_running_loop()
        self._runner = runner
        self.stopping = False
        self._site = ListenerSite(runner, self, host, port)
        await self._site.start()
        log.info("listener: at most %d connections (file-descriptor limit %d), idle %s s, "
                 "headers %s s, body stall %s s, body %s s", self.max_connections, self.nofile,
                 self.settings.idle_timeout, self.settings.header_timeout,
                 self.settings.body_stall_timeout, self.settings.body_timeout)

    @property
    def port(self) -> int | None:
        return self._site.port if self._site is not None else None

    def handler_args(self) -> dict[str, Any]:
        return {
            "keepalive_timeout": self.settings.idle_timeout,
            "max_line_size": MAX_REQUEST_LINE,
            "access_log": None,
            # An unread body is drained at most this long after the answer, then cut.
            "lingering_time": min(10.0, self.settings.body_stall_timeout),
        }

    def protocol(self) -> ListenerConnection:
        """The protocol factory of the listening socket."""
        if self._runner is None or self._runner.server is None:
            raise RuntimeError("the listener is not started")
        return ListenerConnection(self, self._runner.server, **self.handler_args())

    def opened(self, conn: ListenerConnection) -> None:
        for victim in self.table.opened(conn):
            if victim is conn:
                self.warn("connection cap reached (%d, appservice.listener."
                          "max_connections) and every connection has a request in flight: "
                          "closed the new connection from %s", self.table.cap, conn.peername)
            else:
                self.warn("connection cap reached (%d, appservice.listener."
                          "max_connections): closed the least recently active idle "
                          "connection to serve a new one", self.table.cap)
            victim.close_for("cap")

    def warn(self, template: str, *args: Any) -> None:
        """A warning about clients; repeats are limited by the log filter (one template each)."""
        log.warning(template, *args)

    def _middleware(self) -> Any:
        listener = self

        @web.middleware
        async def listener_middleware(request: web.Request, handler: Handler
                                      ) -> web.StreamResponse:
            conn = request.protocol
            if isinstance(conn, ListenerConnection):
                conn.request_started()
            watch = None
            if request.body_exists and not request.content.is_eof():
                settings = listener.settings

                def timed_out(message: str) -> None:
                    listener.warn("dropped %s %s from %s: %s", request.method, request.path,
                                  request.remote, message)

                watch = BodyWatch(asyncio.get_running_loop(), request.content,
                                  stall=settings.body_stall_timeout, total=settings.body_timeout,
                                  on_timeout=timed_out)
            try:
                return await handler(request)
            except BodyTimeout as e:
                response = web.json_response(e.to_json(), status=e.status)
                response.force_close()
                return response
            finally:
                if watch is not None:
                    watch.stop()

        return listener_middleware


class ListenerSite(web.BaseSite):
    """A TCP site whose connections are :class:`ListenerConnection` (as TCPSite otherwise)."""

    def __init__(self, runner: web.AppRunner, listener: Listener, host: str, port: int) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._listener = listener
        self._host, self._port = host, port
        self._bound_port: int | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        return self._bound_port if self._bound_port is not None else self._port

    async def start(self) -> None:
        await super().start()
        server = await asyncio.get_running_loop().create_server(
            self._listener.protocol, self._host, self._port, backlog=self._backlog)
        self._server = server
        if server.sockets:
            self._bound_port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._listener.stopping = True
        await super().stop()
