"""The API's operations as plain async functions: checked inputs in, a JSON-ready answer out.

The HTTP handlers (:mod:`.handlers`) and the in-process client (:mod:`dmbridge.embedded`)
both call :meth:`Operations.perform`, so each check (fields, permissions, quotas, rate limits,
idempotency by message ID) and each error is the same whichever way a platform calls.
Operations are named by their ``operationId`` in openapi.yaml.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from ..dms import DM, DMService, SendResult
from ..errors import (
    BadRequest,
    Forbidden,
    InvalidParam,
    MissingToken,
    UnknownToken,
    storable,
)
from ..ghosts import MAX_DISPLAYNAME
from ..media import MediaService
from ..networks import Network
from ..outbox import Outbox, describe
from ..quotas import Quotas
from ..ratelimit import default_budget
from ..readiness import Readiness
from ..relations import Target
from . import body as f
from .body import id_list
from .discovery import describe as describe_network
from .inflight import InFlight

Answer = dict[str, Any]


@dataclass
class Input:
    """What a request brings: its network (authenticated), JSON body, query and path values,
    and for an upload the bytes with their declared type."""

    network: Network
    body: dict[str, Any] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    args: Mapping[str, str] = field(default_factory=dict)
    content: AsyncIterator[bytes] | None = None
    content_type: str | None = None
    length: int | None = None


@dataclass(frozen=True)
class Operation:
    run: Callable[[Operations, Input], Awaitable[Answer]]
    reads_body: bool = False  # the request's body is a JSON object
    reads_file: bool = False  # the request's body is a file, its Content-Type its type
    counted: bool = False  # a message, edit, reaction or deletion: counts against the quota
    status: int = 200


def authorize(settings: Settings, network_id: str, token: str) -> Network:
    """The network a request is for, if ``token`` is one of its tokens."""
    if not token:
        raise MissingToken("an 'Authorization: Bearer <network token>' header is required")
    holder = settings.networks.by_token(token)
    if holder is None:
        raise UnknownToken("the token is not valid for any network")
    network: Network = settings.networks.get(network_id)
    if network.id != holder.id:
        raise Forbidden(f"the token belongs to network '{holder.id}', not '{network.id}'")
    return network


class Operations:
    """The bridge's services behind the API, and the one way to perform an operation."""

    def __init__(self, service: DMService, outbox: Outbox, media: MediaService,
                 settings: Settings, quotas: Quotas, readiness: Readiness | None = None
                 ) -> None:
        self.service = service
        self.outbox = outbox
        self.media = media
        self.settings = settings
        self.quotas = quotas
        self.readiness = readiness
        self.in_flight = InFlight()  # operations begun in this process, awaited at stop

    def charge(self, name: str, network: Network) -> None:
        """Counts a message, edit, reaction or deletion against the network's quota
        (QuotaExceeded when it is too fast): before its body is read, so a network over its
        quota is refused without the bridge reading what it sent."""
        if OPERATIONS[name].counted:
            self.quotas.message(network)

    async def perform(self, name: str, request: Input, *, charged: bool = False) -> Answer:
        """Operation ``name`` on ``request``; ``charged``: :meth:`charge` was called for it."""
        operation = OPERATIONS[name]
        with default_budget(self.settings.rate_limits.request_wait):
            if not charged:
                self.charge(name, request.network)
            return await operation.run(self, request)


def _sender_name(network: Network, body: Mapping[str, Any], name: f.Text, remote_id: str
                 ) -> str | None:
    """The sender's name, refused up front when the ghost's display name would be too long
    for the homeserver (which would refuse it only once the DM room is open)."""
    value = name.get(body)
    if value is not None and len(network.ghost_displayname(remote_id, value)) > MAX_DISPLAYNAME:
        raise InvalidParam(
            f"'{name.key}' makes the ghost's display name (network template "
            f"{network.displayname!r}) longer than {MAX_DISPLAYNAME} characters")
    return value


def _dm_json(dm: DM) -> Answer:
    return {
        "room_id": dm.room_id,
        "network": dm.network,
        "remote_id": dm.remote_id,
        "ghost_id": dm.ghost_id,
        "user_id": dm.user_id,
        "user_membership": dm.user_membership,
        "state": dm.state,
    }


def _sent_json(result: SendResult) -> Answer:
    return {"room_id": result.room_id, "event_id": result.event_id,
            "room_created": result.room_created, "duplicate": result.duplicate}


async def send_message(ops: Operations, r: Input) -> Answer:
    network, body = r.network, r.body
    sender = f.SENDER.need(body)
    result = await ops.service.send(
        network.id,
        sender,
        f.RECIPIENT.need(body),
        message_id=r.args["message_id"],
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


async def set_profile(ops: Operations, r: Input) -> Answer:
    """A ghost's display name and avatar, as the platform says; absent keys stay as they are."""
    remote_id = r.args["remote_id"]
    ghost_id, name, avatar = await ops.service.set_profile(
        r.network.id, storable(remote_id, "remote_id"),
        name=_sender_name(r.network, r.body, f.NAME, remote_id),
        avatar=f.AVATAR.get(r.body),
    )
    return {"ghost_id": ghost_id, "displayname": name, "avatar_url": avatar}


async def react(ops: Operations, r: Input) -> Answer:
    target = Target.parse(r.body, "target")
    if target is None:
        raise BadRequest("'target' is required: {\"message_id\": ...} or {\"event_id\": ...}")
    result = await ops.service.react(
        r.network.id,
        f.SENDER.need(r.body),
        f.RECIPIENT.need(r.body),
        reaction_id=r.args["reaction_id"],
        target=target,
        key=r.body.get("key"),  # type: ignore[arg-type]  # checked by the service
    )
    return _sent_json(result)


async def delete_message(ops: Operations, r: Input) -> Answer:
    sender = f.SENDER.need(r.query)  # query parameters follow the rules of body fields
    reason = f.REASON.get(r.query)
    result = await ops.service.redact(
        r.network.id, sender, message_id=r.args["message_id"], reason=reason or None)
    return {"room_id": result.room_id, "event_id": result.event_id,
            "duplicate": result.duplicate}


async def upload_media(ops: Operations, r: Input) -> Answer:
    """The bytes of a file; their declared type is checked against them."""
    if r.content is None:
        raise BadRequest("the request has no file")
    media = await ops.media.upload(
        r.network, r.content, content_type=r.content_type, length=r.length,
        filename=r.query.get("filename"),
    )
    return {"content_uri": media.content_uri, "mimetype": media.mimetype, "size": media.size,
            "filename": media.filename, "width": media.width, "height": media.height}


async def download(ops: Operations, network: Network, server: str, media_id: str,
                   expires: str | None, sig: str | None) -> bytes:
    """A Matrix user's file, whole, through a link the bridge gave this network."""
    upstream = await ops.media.open_download(network, server, media_id, expires, sig)
    try:
        return await upstream.read()
    finally:
        upstream.release()


async def open_dm(ops: Operations, r: Input) -> Answer:
    network, body = r.network, r.body
    sender = f.SENDER.need(body)
    opened = await ops.service.open_dm(
        network.id,
        sender,
        f.RECIPIENT.need(body),
        sender_name=_sender_name(network, body, f.SENDER_NAME, sender),
        sender_avatar=f.SENDER_AVATAR.get(body),
        new=f.NEW.get(body),
        replaces=f.REPLACES.get(body),
    )
    if opened.replaced is not None:  # its dm.ended notice is queued
        ops.outbox.wake({network.id})
    return {**_dm_json(opened.dm), "created": opened.created,
            "replaced_room_id": opened.replaced}


async def list_dms(ops: Operations, r: Input) -> Answer:
    dms = await ops.service.list_dms(
        network_id=r.network.id, user_id=f.USER_ID.get(r.query),
        remote_id=f.REMOTE_ID.get(r.query), limit=int(f.LIMIT.get(r.query)),
    )
    return {"dms": [_dm_json(dm) for dm in dms]}


async def network_info(ops: Operations, r: Input) -> Answer:
    """The network's ID format, ghost names, delivery mode and limits."""
    return describe_network(r.network, ops.settings)


async def set_typing(ops: Operations, r: Input) -> Answer:
    body = r.body
    typing = body.get("typing")
    if not isinstance(typing, bool):
        raise BadRequest("'typing' must be true or false")
    timeout, low, high = body.get("timeout_ms", f.TIMEOUT_MS.default), f.TIMEOUT_MS.low, \
        f.TIMEOUT_MS.high
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not low <= timeout <= high:
        raise BadRequest(f"'timeout_ms' must be an integer from {low:.0f} to {high:.0f}")
    room_id = await ops.service.set_typing(
        r.network.id, f.SENDER.need(body), f.RECIPIENT.need(body), typing=typing,
        timeout_ms=timeout,
    )
    return {"room_id": room_id}


async def mark_read(ops: Operations, r: Input) -> Answer:
    room_id = await ops.service.mark_read(
        r.network.id, f.SENDER.need(r.body), f.RECIPIENT.need(r.body),
        event_id=f.EVENT_ID.need(r.body),
    )
    return {"room_id": room_id}


async def pull_events(ops: Operations, r: Input) -> Answer:
    """Long-poll for what the network's users are owed; acknowledged by ``ackEvents``."""
    q = r.query
    after, limit, wait = int(f.AFTER.get(q)), int(f.LIMIT.get(q)), f.WAIT.get(q)
    items = await ops.outbox.pull(r.network, after, wait, limit)
    return {"events": [ops.outbox.present(i) for i in items],
            "next_after": max([after, *(i.id for i in items)])}


async def ack_events(ops: Operations, r: Input) -> Answer:
    count = await ops.outbox.ack(r.network, id_list(r.body, "ids"))
    return {"acknowledged": count}


async def dead_letters(ops: Operations, r: Input) -> Answer:
    items = await ops.outbox.dead_letters(r.network, int(f.LIMIT.get(r.query)))
    return {"dead_letters": [describe(i) for i in items]}


async def retry_dead_letters(ops: Operations, r: Input) -> Answer:
    every = r.body.get("all")
    if every is not None and "ids" in r.body:
        raise BadRequest("give either 'all': true or 'ids', not both")
    if every is not None and every is not True:
        raise BadRequest("'all' must be true (or left out, with 'ids')")
    ids = None if every is True else id_list(r.body, "ids")
    return {"requeued": await ops.outbox.retry(r.network, ids)}


OPERATIONS: dict[str, Operation] = {
    "getNetwork": Operation(network_info),
    "sendMessage": Operation(send_message, reads_body=True, counted=True),
    "deleteMessage": Operation(delete_message, counted=True),
    "react": Operation(react, reads_body=True, counted=True),
    "setGhostProfile": Operation(set_profile, reads_body=True),
    "uploadMedia": Operation(upload_media, reads_file=True, status=201),
    "openDM": Operation(open_dm, reads_body=True),
    "listDMs": Operation(list_dms),
    "setTyping": Operation(set_typing, reads_body=True),
    "markRead": Operation(mark_read, reads_body=True),
    "pullEvents": Operation(pull_events),
    "ackEvents": Operation(ack_events, reads_body=True),
    "listDeadLetters": Operation(dead_letters),
    "retryDeadLetters": Operation(retry_dead_letters, reads_body=True),
}
