"""Request handlers: parse, call the Python API, answer. No logic of their own."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..dms import DM
from ..errors import BadRequest
from . import app as api
from .body import read_object, required_string, string


def _dm_json(dm: DM) -> dict[str, Any]:
    return {
        "room_id": dm.room_id,
        "network": dm.network,
        "remote_id": dm.remote_id,
        "ghost_id": dm.ghost_id,
        "user_id": dm.user_id,
        "user_membership": dm.user_membership,
    }


async def send_message(request: web.Request) -> web.Response:
    network = request[api.NETWORK]
    body = await read_object(request, request.app[api.SETTINGS].max_body_bytes)
    result = await request.app[api.SERVICE].send(
        network.id,
        required_string(body, "sender", 255),
        required_string(body, "recipient", 255),
        message_id=request.match_info["message_id"],
        text=required_string(body, "text"),
        html=string(body, "html", required=False),
        sender_name=string(body, "sender_name", required=False, max_len=255),
    )
    return web.json_response({
        "room_id": result.room_id,
        "event_id": result.event_id,
        "room_created": result.room_created,
        "duplicate": result.duplicate,
    })


async def open_dm(request: web.Request) -> web.Response:
    network = request[api.NETWORK]
    body = await read_object(request, request.app[api.SETTINGS].max_body_bytes)
    opened = await request.app[api.SERVICE].open_dm(
        network.id,
        required_string(body, "sender", 255),
        required_string(body, "recipient", 255),
        sender_name=string(body, "sender_name", required=False, max_len=255),
    )
    return web.json_response({**_dm_json(opened.dm), "created": opened.created})


async def list_dms(request: web.Request) -> web.Response:
    network = request[api.NETWORK]
    query = request.rel_url.query
    try:
        limit = int(query.get("limit", "100"))
    except ValueError:
        raise BadRequest("'limit' must be an integer") from None
    if not 1 <= limit <= 1000:
        raise BadRequest("'limit' must be from 1 to 1000")
    dms = await request.app[api.SERVICE].list_dms(
        network_id=network.id, user_id=query.get("user_id"), remote_id=query.get("remote_id"),
        limit=limit,
    )
    return web.json_response({"dms": [_dm_json(dm) for dm in dms]})


async def health(request: web.Request) -> web.Response:
    await request.app[api.SERVICE].stores.db.fetchval("SELECT 1")
    return web.json_response({"status": "ok"})
