"""Request handlers: read the request, perform the operation, answer. No logic of their own."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from ..media import media_headers
from . import app as api
from .body import read_object
from .operations import OPERATIONS, Input

log = logging.getLogger("dmbridge.api")


def endpoint(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of operation ``name`` (its operationId): the request's network, body,
    query and path values in, the operation's answer out as JSON."""
    operation = OPERATIONS[name]

    async def handle(request: web.Request) -> web.Response:
        ops = request.app[api.OPERATIONS]
        network = request[api.NETWORK]
        ops.charge(name, network)
        body = await read_object(request, ops.settings.max_body_bytes) \
            if operation.reads_body else {}
        file = operation.reads_file
        answer = await ops.perform(name, Input(
            network=network, body=body, query=request.rel_url.query,
            args=request.match_info,
            content=request.content.iter_chunked(65536) if file else None,
            content_type=request.headers.get("Content-Type") if file else None,
            length=request.content_length if file else None,
        ), charged=True)
        return web.json_response(answer, status=operation.status)

    handle.__name__ = name
    return handle


async def download_media(request: web.Request) -> web.StreamResponse:
    """A Matrix user's media, through a link the bridge gave this network, streamed."""
    service = request.app[api.OPERATIONS].media
    server, media_id = request.match_info["server"], request.match_info["media_id"]
    query = request.rel_url.query
    upstream = await service.open_download(request[api.NETWORK], server, media_id,
                                           query.get("expires"), query.get("sig"))
    try:
        response = web.StreamResponse(headers=media_headers(upstream.headers))
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(65536):
                await response.write(chunk)
            await response.write_eof()
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
            # The answer has begun: an error body would corrupt the file. Cut the connection,
            # so the platform sees a short download, not a wrong one.
            log.warning("media %s/%s: download cut short: %r", server, media_id, e)
            if request.transport is not None:
                request.transport.close()
        return response
    finally:
        upstream.release()


async def health(request: web.Request) -> web.Response:
    await request.app[api.OPERATIONS].service.stores.db.fetchval("SELECT 1")
    return web.json_response({"status": "ok"})


async def live(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    readiness = request.app[api.OPERATIONS].readiness
    assert readiness is not None, "the API was made without the bridge's readiness"
    failing = await readiness.now()
    if not failing:
        return web.json_response({"status": "ready"})
    checks = ", ".join(p.check for p in failing)
    return web.json_response({"errcode": "DMBRIDGE_NOT_READY", "error": f"not ready: {checks}",
                              "failing": [p.to_json() for p in failing]}, status=503)
