"""Request handlers: parse, call the Python API, answer. No logic of their own."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from aiohttp import web

from ..dms import DM, SendResult
from ..errors import BadRequest, InvalidParam, storable
from ..ghosts import MAX_DISPLAYNAME
from ..media import media_headers
from ..networks import Network
from ..outbox import describe
from ..relations import Target
from . import app as api
from . import body as f
from .body import id_list, read_object
from .discovery import describe as describe_network

log = logging.getLogger("dmbridge.api")


def _sender_name(network: Network, body: dict[str, Any], field: f.Text, remote_id: str
                 ) -> str | None:
    """The sender's name, refused up front when the ghost's display name would be too long
    for the homeserver (which would refuse it only once the DM room is open)."""
    name = field.get(body)
    if name is not None and len(network.ghost_displayname(remote_id, name)) > MAX_DISPLAYNAME:
        raise InvalidParam(
            f"'{field.key}' makes the ghost's display name (network template "
            f"{network.displayname!r}) longer than {MAX_DISPLAYNAME} characters")
    return name


def _dm_json(dm: DM) -> dict[str, Any]:
    return {
        "room_id": dm.room_id,
        "network": dm.network,
        "remote_id": dm.remote_id,
        "ghost_id": dm.ghost_id,
        "user_id": dm.user_id,
        "user_membership": dm.user_membership,
        "state": dm.state,
    }


async def send_message(request: web.Request) -> web.Response:
    network = request[api.NETWORK]
    body = await read_object(request, request.app[api.SETTINGS].max_body_bytes)
    sender = f.SENDER.need(body)
    result = await request.app[api.SERVICE].send(
        network.id,
        sender,
        f.RECIPIENT.need(body),
        message_id=request.match_info["message_id"],
        text=f.TEXT.get(body),
        html=f.HTML.get(body),
        markdown=f.MARKDOWN.get(body),
        msgtype=f.MSGTYPE.get(body) or "text",
        sender_name=_sender_name(network, body, f.SENDER_NAME, sender),
        sender_avatar=f.SENDER_AVATAR.get(body),
        media=f.MEDIA.get(body),
        reply_to=Target.parse(body, "reply_to"),
        edits=f.EDITS.get(body),
        thread_root=Target.parse(body, "thread_root"),
        ts=f.TS.get(body),
    )
    return _sent_json(result)


def _sent_json(result: SendResult) -> web.Response:
    return web.json_response({
        "room_id": result.room_id,
        "event_id": result.event_id,
        "room_created": result.room_created,
        "duplicate": result.duplicate,
    })


async def set_profile(request: web.Request) -> web.Response:
    """A ghost's display name and avatar, as the platform says; absent keys stay as they are."""
    body = await read_object(request, request.app[api.SETTINGS].max_body_bytes)
    network, remote_id = request[api.NETWORK], request.match_info["remote_id"]
    ghost_id, name, avatar = await request.app[api.SERVICE].set_profile(
        network.id, storable(remote_id, "remote_id"),
        name=_sender_name(network, body, f.NAME, remote_id),
        avatar=f.AVATAR.get(body),
    )
    return web.json_response({"ghost_id": ghost_id, "displayname": name, "avatar_url": avatar})


async def react(request: web.Request) -> web.Response:
    body = await read_object(request, request.app[api.SETTINGS].max_body_bytes)
    target = Target.parse(body, "target")
    if target is None:
        raise BadRequest("'target' is required: {\"message_id\": ...} or {\"event_id\": ...}")
    result = await request.app[api.SERVICE].react(
        request[api.NETWORK].id,
        f.SENDER.need(body),
        f.RECIPIENT.need(body),
        reaction_id=request.match_info["reaction_id"],
        target=target,
        key=body.get("key"),  # type: ignore[arg-type]  # checked by the service
    )
    return _sent_json(result)


async def delete_message(request: web.Request) -> web.Response:
    query = request.rel_url.query  # query parameters follow the rules of body fields
    sender = f.SENDER.need(query)
    reason = f.REASON.get(query)
    result = await request.app[api.SERVICE].redact(
        request[api.NETWORK].id, sender, message_id=request.match_info["message_id"],
        reason=reason or None,
    )
    return web.json_response({"room_id": result.room_id, "event_id": result.event_id,
                              "duplicate": result.duplicate})


async def upload_media(request: web.Request) -> web.Response:
    """The body is the file itself; its Content-Type says what it is and is checked."""
    media = await request.app[api.MEDIA].upload(
        request[api.NETWORK], request.content.iter_chunked(65536),
        content_type=request.headers.get("Content-Type"), length=request.content_length,
        filename=request.rel_url.query.get("filename"),
    )
    return web.json_response({
        "content_uri": media.content_uri, "mimetype": media.mimetype, "size": media.size,
        "filename": media.filename, "width": media.width, "height": media.height,
    }, status=201)


async def download_media(request: web.Request) -> web.StreamResponse:
    """A Matrix user's media, through a link the bridge gave this network."""
    service = request.app[api.MEDIA]
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


async def open_dm(request: web.Request) -> web.Response:
    network = request[api.NETWORK]
    body = await read_object(request, request.app[api.SETTINGS].max_body_bytes)
    sender = f.SENDER.need(body)
    opened = await request.app[api.SERVICE].open_dm(
        network.id,
        sender,
        f.RECIPIENT.need(body),
        sender_name=_sender_name(network, body, f.SENDER_NAME, sender),
        sender_avatar=f.SENDER_AVATAR.get(body),
        new=f.NEW.get(body),
        replaces=f.REPLACES.get(body),
    )
    if opened.replaced is not None:  # its dm.ended notice is queued
        request.app[api.OUTBOX].wake({network.id})
    return web.json_response({**_dm_json(opened.dm), "created": opened.created,
                              "replaced_room_id": opened.replaced})


async def list_dms(request: web.Request) -> web.Response:
    network = request[api.NETWORK]
    query = request.rel_url.query
    dms = await request.app[api.SERVICE].list_dms(
        network_id=network.id, user_id=f.USER_ID.get(query), remote_id=f.REMOTE_ID.get(query),
        limit=int(f.LIMIT.get(query)),
    )
    return web.json_response({"dms": [_dm_json(dm) for dm in dms]})


async def network_info(request: web.Request) -> web.Response:
    """The network's ID format, ghost names, delivery mode and limits."""
    return web.json_response(describe_network(request[api.NETWORK], request.app[api.SETTINGS]))


async def health(request: web.Request) -> web.Response:
    await request.app[api.SERVICE].stores.db.fetchval("SELECT 1")
    return web.json_response({"status": "ok"})


async def live(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    failing = await request.app[api.READINESS].now()
    if not failing:
        return web.json_response({"status": "ready"})
    checks = ", ".join(p.check for p in failing)
    return web.json_response({"errcode": "DMBRIDGE_NOT_READY", "error": f"not ready: {checks}",
                              "failing": [p.to_json() for p in failing]}, status=503)


async def set_typing(request: web.Request) -> web.Response:
    body = await read_object(request, request.app[api.SETTINGS].max_body_bytes)
    typing = body.get("typing")
    if not isinstance(typing, bool):
        raise BadRequest("'typing' must be true or false")
    timeout, low, high = body.get("timeout_ms", f.TIMEOUT_MS.default), f.TIMEOUT_MS.low, \
        f.TIMEOUT_MS.high
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not low <= timeout <= high:
        raise BadRequest(f"'timeout_ms' must be an integer from {low:.0f} to {high:.0f}")
    room_id = await request.app[api.SERVICE].set_typing(
        request[api.NETWORK].id, f.SENDER.need(body), f.RECIPIENT.need(body), typing=typing,
        timeout_ms=timeout,
    )
    return web.json_response({"room_id": room_id})


async def mark_read(request: web.Request) -> web.Response:
    body = await read_object(request, request.app[api.SETTINGS].max_body_bytes)
    room_id = await request.app[api.SERVICE].mark_read(
        request[api.NETWORK].id, f.SENDER.need(body), f.RECIPIENT.need(body),
        event_id=f.EVENT_ID.need(body),
    )
    return web.json_response({"room_id": room_id})


async def pull_events(request: web.Request) -> web.Response:
    """Long-poll for what the network's users are owed; acknowledge with POST .../events/ack."""
    query = request.rel_url.query
    after, limit, wait = int(f.AFTER.get(query)), int(f.LIMIT.get(query)), f.WAIT.get(query)
    items = await request.app[api.OUTBOX].pull(request[api.NETWORK], after, wait, limit)
    next_after = max([after, *(i.id for i in items)])
    outbox = request.app[api.OUTBOX]
    return web.json_response({"events": [outbox.present(i) for i in items],
                              "next_after": next_after})


async def ack_events(request: web.Request) -> web.Response:
    body = await read_object(request, request.app[api.SETTINGS].max_body_bytes)
    count = await request.app[api.OUTBOX].ack(request[api.NETWORK], id_list(body, "ids"))
    return web.json_response({"acknowledged": count})


async def dead_letters(request: web.Request) -> web.Response:
    limit = int(f.LIMIT.get(request.rel_url.query))
    items = await request.app[api.OUTBOX].dead_letters(request[api.NETWORK], limit)
    return web.json_response({"dead_letters": [describe(i) for i in items]})


async def retry_dead_letters(request: web.Request) -> web.Response:
    body = await read_object(request, request.app[api.SETTINGS].max_body_bytes)
    every = body.get("all")
    if every is not None and "ids" in body:
        raise BadRequest("give either 'all': true or 'ids', not both")
    if every is not None and every is not True:
        raise BadRequest("'all' must be true (or left out, with 'ids')")
    ids = None if every is True else id_list(body, "ids")
    requeued = await request.app[api.OUTBOX].retry(request[api.NETWORK], ids)
    return web.json_response({"requeued": requeued})
