"""The /_dmbridge/v1 application: routes, authentication, and the one error boundary."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from ..errors import BridgeError
from ..networks import Network
from ..ratelimit import budget_middleware
from . import handlers
from .operations import Operations, authorize

log = logging.getLogger("dmbridge.api")

PREFIX = "/_dmbridge/v1"
OPERATIONS = web.AppKey("operations", Operations)
NETWORK = web.RequestKey("network", Network)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_HTTP_ERRCODES = {404: "M_UNRECOGNIZED", 405: "M_UNRECOGNIZED", 413: "M_TOO_LARGE"}


@web.middleware
async def error_boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a Matrix-style JSON error; nothing else reaches the caller."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        errcode = _HTTP_ERRCODES.get(e.status, "M_UNKNOWN")
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None  # 405 needs it
        return web.json_response({"errcode": errcode, "error": e.reason}, status=e.status,
                                 headers=allow)
    except Exception as e:
        error = as_bridge_error(e, f"{request.method} {request.path}")
        return web.json_response(error.to_json(), status=error.status, headers=error.headers())


def as_bridge_error(e: Exception, what: str) -> BridgeError:
    """The answer for a failed operation: a :class:`BridgeError` as it is, anything else an
    internal error with a reference to its traceback in the log."""
    if isinstance(e, BridgeError):
        if e.status >= 500:
            log.warning("%s -> %d %s: %s", what, e.status, e.errcode, e)
        return e
    ref = secrets.token_hex(4)
    log.error("%s failed (ref %s)", what, ref, exc_info=e)
    return BridgeError(f"internal error (ref {ref}, see the bridge's log)")


@web.middleware
async def network_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Routes under /networks/{network}/ need that network's bearer token."""
    network_id = request.match_info.get("network")
    if network_id is None:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header.startswith("Bearer ") else ""
    request[NETWORK] = authorize(request.app[OPERATIONS].settings, network_id, token)
    return await handler(request)


async def openapi(_: web.Request) -> web.Response:
    text = resources.files("dmbridge.api").joinpath("openapi.yaml").read_text()
    return web.Response(text=text, content_type="application/yaml")


def api_app(ops: Operations) -> web.Application:
    """The HTTP API over ``ops``: one route per operation."""
    budget = budget_middleware(ops.settings.rate_limits.request_wait)
    app = web.Application(middlewares=[error_boundary, network_auth, budget])
    app[OPERATIONS] = ops
    # HEAD is not part of the API (it is not in openapi.yaml): answered 405 like other methods.
    app.router.add_get("/openapi.yaml", openapi, allow_head=False)
    app.router.add_get("/health", handlers.health, allow_head=False)
    app.router.add_get("/health/live", handlers.live, allow_head=False)
    app.router.add_get("/health/ready", handlers.ready, allow_head=False)
    app.router.add_get("/networks/{network}/media/{server}/{media_id}", handlers.download_media,
                       allow_head=False)
    for name, (method, path) in ROUTES.items():
        app.router.add_route(method, "/networks/{network}" + path, handlers.endpoint(name))
    return app


# operationId -> method and path under /networks/{network}; HEAD is answered 405.
ROUTES: dict[str, tuple[str, str]] = {
    "getNetwork": ("GET", ""),
    "sendMessage": ("PUT", "/messages/{message_id}"),
    "deleteMessage": ("DELETE", "/messages/{message_id}"),
    "react": ("PUT", "/reactions/{reaction_id}"),
    "setGhostProfile": ("PUT", "/ghosts/{remote_id}/profile"),
    "uploadMedia": ("POST", "/media"),
    "openDM": ("POST", "/dms"),
    "listDMs": ("GET", "/dms"),
    "setTyping": ("PUT", "/typing"),
    "markRead": ("POST", "/read"),
    "pullEvents": ("GET", "/events"),
    "ackEvents": ("POST", "/events/ack"),
    "listDeadLetters": ("GET", "/dead-letters"),
    "retryDeadLetters": ("POST", "/dead-letters/retry"),
}
