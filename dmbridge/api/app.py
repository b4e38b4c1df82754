"""The /_dmbridge/v1 application: routes, authentication, and the one error boundary."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from ..config import Settings
from ..dms import DMService
from ..errors import BridgeError, Forbidden, MissingToken, UnknownToken
from ..media import MediaService
from ..networks import Network
from ..outbox import Outbox
from ..quotas import Quotas
from ..ratelimit import budget_middleware
from ..readiness import Readiness
from . import handlers

log = logging.getLogger("dmbridge.api")

PREFIX = "/_dmbridge/v1"
SERVICE = web.AppKey("service", DMService)
OUTBOX = web.AppKey("outbox", Outbox)
MEDIA = web.AppKey("media", MediaService)
SETTINGS = web.AppKey("settings", Settings)
QUOTAS = web.AppKey("quotas", Quotas)
READINESS = web.AppKey("readiness", Readiness)
NETWORK = web.RequestKey("network", Network)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_HTTP_ERRCODES = {404: "M_UNRECOGNIZED", 405: "M_UNRECOGNIZED", 413: "M_TOO_LARGE"}


@web.middleware
async def error_boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a Matrix-style JSON error; nothing else reaches the caller."""
    try:
        return await handler(request)
    except BridgeError as e:
        if e.status >= 500:
            log.warning("%s %s -> %d %s: %s", request.method, request.path, e.status, e.errcode, e)
        return web.json_response(e.to_json(), status=e.status, headers=e.headers())
    except web.HTTPException as e:
        if e.status < 400:
            raise
        errcode = _HTTP_ERRCODES.get(e.status, "M_UNKNOWN")
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None  # 405 needs it
        return web.json_response({"errcode": errcode, "error": e.reason}, status=e.status,
                                 headers=allow)
    except Exception:
        ref = secrets.token_hex(4)
        log.exception("%s %s failed (ref %s)", request.method, request.path, ref)
        return web.json_response(
            {"errcode": "M_UNKNOWN", "error": f"internal error (ref {ref}, see the bridge's log)"},
            status=500,
        )


@web.middleware
async def network_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Routes under /networks/{network}/ need that network's bearer token."""
    network_id = request.match_info.get("network")
    if network_id is None:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or not header[7:].strip():
        raise MissingToken("an 'Authorization: Bearer <network token>' header is required")
    settings = request.app[SETTINGS]
    holder = settings.networks.by_token(header[7:].strip())
    if holder is None:
        raise UnknownToken("the token is not valid for any network")
    network: Network = settings.networks.get(network_id)
    if network.id != holder.id:
        raise Forbidden(f"the token belongs to network '{holder.id}', not '{network.id}'")
    request[NETWORK] = network
    return await handler(request)


def _counted(handler: Handler) -> Handler:
    """A message, edit, reaction or deletion: it counts against the network's quota."""

    async def counted(request: web.Request) -> web.StreamResponse:
        request.app[QUOTAS].message(request[NETWORK])
        return await handler(request)

    return counted


async def openapi(_: web.Request) -> web.Response:
    text = resources.files("dmbridge.api").joinpath("openapi.yaml").read_text()
    return web.Response(text=text, content_type="application/yaml")


def make_api_app(service: DMService, outbox: Outbox, media: MediaService, settings: Settings,
                 quotas: Quotas, *, readiness: Readiness | None = None) -> web.Application:
    budget = budget_middleware(settings.rate_limits.request_wait)
    app = web.Application(middlewares=[error_boundary, network_auth, budget])
    app[SERVICE] = service
    app[QUOTAS] = quotas
    app[MEDIA] = media
    app[OUTBOX] = outbox
    app[SETTINGS] = settings
    if readiness is not None:
        app[READINESS] = readiness
    # HEAD is not part of the API (it is not in openapi.yaml): answered 405 like other methods.
    app.router.add_get("/openapi.yaml", openapi, allow_head=False)
    app.router.add_get("/health", handlers.health, allow_head=False)
    app.router.add_get("/health/live", handlers.live, allow_head=False)
    app.router.add_get("/health/ready", handlers.ready, allow_head=False)
    app.router.add_get("/networks/{network}", handlers.network_info, allow_head=False)
    app.router.add_put("/networks/{network}/messages/{message_id}",
                       _counted(handlers.send_message))
    app.router.add_delete("/networks/{network}/messages/{message_id}",
                          _counted(handlers.delete_message))
    app.router.add_put("/networks/{network}/reactions/{reaction_id}", _counted(handlers.react))
    app.router.add_put("/networks/{network}/ghosts/{remote_id}/profile", handlers.set_profile)
    app.router.add_post("/networks/{network}/media", handlers.upload_media)
    app.router.add_get("/networks/{network}/media/{server}/{media_id}", handlers.download_media,
                       allow_head=False)
    app.router.add_post("/networks/{network}/dms", handlers.open_dm)
    app.router.add_get("/networks/{network}/dms", handlers.list_dms, allow_head=False)
    app.router.add_put("/networks/{network}/typing", handlers.set_typing)
    app.router.add_post("/networks/{network}/read", handlers.mark_read)
    app.router.add_get("/networks/{network}/events", handlers.pull_events, allow_head=False)
    app.router.add_post("/networks/{network}/events/ack", handlers.ack_events)
    app.router.add_get("/networks/{network}/dead-letters", handlers.dead_letters,
                       allow_head=False)
    app.router.add_post("/networks/{network}/dead-letters/retry", handlers.retry_dead_letters)
    return app
