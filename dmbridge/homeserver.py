"""Requests to the homeserver: counted, and the hot-path send made without extra layers.

Both HTTP paths to the homeserver (this module's session and the one mautrix's intents use)
carry the same client middleware (:class:`dmbridge.ratelimit.HomeserverLimits`), which counts
every request into the :class:`RequestLog` and waits out rate limits.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, BinaryIO
from urllib.parse import quote

import aiohttp
from aiohttp.client_middlewares import ClientMiddlewareType
from mautrix.errors import MatrixError, MatrixRequestError, make_request_error
from mautrix.types import EventID, RoomID, UserID
from olm.account import OlmAccountError
from olm.group_session import OlmGroupSessionError
from olm.session import OlmSessionError

from .errors import HomeserverError

log = logging.getLogger("dmbridge.homeserver")

_RETRY_STATUSES = (502, 503, 504)
# Media may stream for a long time; only a stall ends it.
MEDIA_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)


class RequestLog:
    """Every request the bridge makes to the homeserver: total, per endpoint, the latest."""

    def __init__(self, recent: int = 1000) -> None:
        self.total = 0
        self.by_endpoint: Counter[str] = Counter()
        self.recent: deque[tuple[str, str]] = deque(maxlen=recent)

    def add(self, method: str, path: str, endpoint: str | None = None) -> None:
        """Count one request; ``endpoint`` is ``method endpoint_of(path)`` if known already."""
        self.total += 1
        self.recent.append((method, path))
        self.by_endpoint[endpoint or f"{method} {endpoint_of(path)}"] += 1


_ID_PREFIXES = ("%21", "!", "%40", "@", "%24", "$", "%23", "#")
_MEDIA = ("download", "thumbnail")
_MEDIA_PARTS = ("{server}", "{media_id}", "{filename}")


def endpoint_of(path: str) -> str:
    """The path with IDs replaced, so counts group by endpoint (and metrics' labels stay few)."""
    parts = path.split("/")
    out = []
    media_at = None
    for i, part in enumerate(parts):
        prev = parts[i - 1] if i else ""
        if media_at is not None:
            out.append(_MEDIA_PARTS[min(i - media_at - 1, len(_MEDIA_PARTS) - 1)])
        elif part in _MEDIA and "media" in parts[:i]:
            media_at = i
            out.append(part)
        elif part.startswith(_ID_PREFIXES) or prev in ("send", "state"):
            out.append("{id}" if prev != "send" else "{type}")
        elif i >= 2 and parts[i - 2] in ("send", "redact"):
            out.append("{txn}")
        else:
            out.append(part)
    return "/".join(out)


# What encrypting a message can fail with (the ghost's device, its keys, the user's devices):
# the platform gets a 502 it may retry, never a 500.
ENCRYPTION_FAILURES = (MatrixError, aiohttp.ClientError, OlmAccountError, OlmGroupSessionError,
                       OlmSessionError)

# Encrypts an event for a room (ghost, room, type, content) as the ghost's device: the type,
# content and device ID to send instead, or None for a room without encryption.
Encrypt = Callable[[UserID, RoomID, str, dict[str, Any]],
                   Awaitable[tuple[str, dict[str, Any], str] | None]]


class Homeserver:
    """The appservice's own HTTP path to the homeserver for the per-message send.

    It has a session of its own without aiohttp's tracing hooks (they cost about a fifth of a
    send); ``middlewares`` count its requests and wait out rate limits.
    """

    def __init__(self, base_url: str, as_token: str,
                 middlewares: Sequence[ClientMiddlewareType] = ()) -> None:
        self.session = aiohttp.ClientSession(middlewares=middlewares)
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {as_token}",
                         "Content-Type": "application/json"}
        self.encrypt: Encrypt | None = None

    async def close(self) -> None:
        await self.session.close()

    async def send_event(
        self, ghost_id: UserID, room_id: RoomID, event_type: str, txn_id: str,
        content: dict[str, Any], attempts: int = 3, *, ts: int | None = None,
    ) -> EventID:
        """Send as a ghost. The txn_id makes retries (ours or the platform's) land once;
        ``ts`` (milliseconds since the epoch) is the event's ``origin_server_ts``. In an
        encrypted room the event is encrypted and sent from the ghost's device."""
        device_id = None
        if self.encrypt is not None:
            try:
                encrypted = await self.encrypt(ghost_id, room_id, event_type, content)
            except ENCRYPTION_FAILURES as e:
                log.warning("%s: %s could not encrypt for the room: %s", room_id, ghost_id, e)
                raise HomeserverError(
                    f"the message could not be encrypted for the room: {e}") from e
            if encrypted is not None:
                event_type, content, device_id = encrypted
        path = (
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/send/"
            f"{quote(event_type, safe='')}/{quote(txn_id, safe='')}"
        )
        return await self._put_event(ghost_id, room_id, path, content, attempts, ts, device_id)

    async def redact(
        self, ghost_id: UserID, room_id: RoomID, event_id: EventID, txn_id: str,
        reason: str | None = None, attempts: int = 3,
    ) -> EventID:
        """Redact an event as a ghost; the txn_id makes a repeated deletion land once."""
        path = (
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/redact/"
            f"{quote(event_id, safe='')}/{quote(txn_id, safe='')}"
        )
        return await self._put_event(ghost_id, room_id, path,
                                     {"reason": reason} if reason else {}, attempts)

    async def _put_event(
        self, ghost_id: UserID, room_id: RoomID, path: str, content: dict[str, Any],
        attempts: int, ts: int | None = None, device_id: str | None = None,
    ) -> EventID:
        url = self.base_url + path
        body = json.dumps(content)
        params: dict[str, str] = {"user_id": ghost_id}
        if ts is not None:
            params["ts"] = str(ts)
        if device_id is not None:
            params["device_id"] = device_id
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                async with self.session.put(
                    url, data=body, params=params, headers=self._headers
                ) as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        return EventID(json.loads(text)["event_id"])
                    if resp.status not in _RETRY_STATUSES or attempt == attempts:
                        raise _request_error(resp.status, text)
            except aiohttp.ClientError as e:
                if attempt == attempts:
                    raise
                log.warning("request to %s failed (%s), retrying", room_id, e)
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def leave_and_forget(self, ghost_id: UserID, room_id: RoomID) -> None:
        """The ghost leaves the room (or refuses its invite) and forgets it. A ghost that is
        no longer in the room counts as gone."""
        room = quote(room_id, safe="")
        for action in ("leave", "forget"):
            async with self.session.post(
                f"{self.base_url}/_matrix/client/v3/rooms/{room}/{action}", data="{}",
                params={"user_id": ghost_id}, headers=self._headers,
            ) as resp:
                text = await resp.text(errors="replace")
                # 403 on a leave: not in the room (any more), unless the homeserver refuses
                # to act as the ghost at all; 404 on a forget: never was.
                gone = (action, resp.status) in (("leave", 403), ("forget", 404),
                                                 ("forget", 400))
                if resp.status != 200 and (not gone or _refused_as_ghost(text)):
                    raise _request_error(resp.status, text)

    async def remove_from_m_direct(self, ghost_id: UserID, room_id: RoomID) -> None:
        """Take the room off the ghost's ``m.direct``: read it, drop the room from every user's
        list (and a list it empties), and write it back only if that changed anything; other
        entries stay as they are."""
        url = (f"{self.base_url}/_matrix/client/v3/user/{quote(ghost_id, safe='')}"
               "/account_data/m.direct")
        params = {"user_id": ghost_id}
        async with self.session.get(url, params=params, headers=self._headers) as resp:
            text = await resp.text(errors="replace")
            if resp.status == 404:  # the ghost never had an m.direct
                return
            if resp.status != 200:
                raise _request_error(resp.status, text)
        current = json.loads(text)
        if not isinstance(current, dict):
            return
        kept: dict[str, Any] = {}
        for user_id, rooms in current.items():
            if not isinstance(rooms, list) or room_id not in rooms:
                kept[user_id] = rooms
            elif others := [r for r in rooms if r != room_id]:
                kept[user_id] = others
        if kept != current:
            async with self.session.put(url, data=json.dumps(kept), params=params,
                                        headers=self._headers) as resp:
                if resp.status != 200:
                    raise _request_error(resp.status, await resp.text(errors="replace"))

    async def reset_profile(self, ghost_id: UserID, displayname: str) -> None:
        """Give the ghost a plain display name and no avatar."""
        user = quote(ghost_id, safe="")
        for field, value in (("displayname", displayname), ("avatar_url", "")):
            async with self.session.put(
                f"{self.base_url}/_matrix/client/v3/profile/{user}/{field}",
                data=json.dumps({field: value}), params={"user_id": ghost_id},
                headers=self._headers,
            ) as resp:
                if resp.status != 200:
                    raise _request_error(resp.status, await resp.text(errors="replace"))

    async def upload(self, data: BinaryIO, mimetype: str, filename: str | None, size: int
                     ) -> str:
        """Store bytes in the homeserver's media repository (as the bridge bot)."""
        path = "/_matrix/media/v3/upload"
        headers = {**self._headers, "Content-Type": mimetype, "Content-Length": str(size)}
        params = {"filename": filename} if filename else None
        async with self.session.post(self.base_url + path, data=data, params=params,
                                     headers=headers, timeout=MEDIA_TIMEOUT) as resp:
            text = await resp.text(errors="replace")
            if resp.status != 200:
                raise _request_error(resp.status, text)
            try:
                return str(json.loads(text)["content_uri"])
            except (ValueError, KeyError, TypeError):
                raise _request_error(502, f"no content_uri in the answer: {text[:200]}") from None

    async def download(self, server: str, media_id: str) -> aiohttp.ClientResponse:
        """Open the homeserver's authenticated media download; the caller reads and closes it."""
        path = f"/_matrix/client/v1/media/download/{quote(server, safe='')}/" \
            f"{quote(media_id, safe='')}"
        resp = await self.session.get(
            self.base_url + path, headers={"Authorization": self._headers["Authorization"]},
            timeout=MEDIA_TIMEOUT,
        )
        if resp.status != 200:
            try:
                text = await resp.text(errors="replace")
            finally:
                resp.release()
            raise _request_error(resp.status, text)
        return resp


def _request_error(status: int, text: str) -> MatrixRequestError:
    try:
        data = json.loads(text)
        errcode, message = data.get("errcode"), data.get("error")
    except (ValueError, AttributeError):
        errcode, message = None, None
    return make_request_error(status, text, errcode, message)


def _refused_as_ghost(text: str) -> bool:
    """A 403 that says the appservice may not act as this user (not in its namespace)."""
    lowered = text.lower()
    return "masquerade" in lowered or "namespace" in lowered or "exclusive" in lowered
