"""The client of one network: open DMs, send, upload, and handle what comes back."""

from __future__ import annotations

import functools
import io
import os
import uuid
from collections.abc import AsyncIterable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import aiohttp

from .backend import Backend, Call
from .dm import DM
from .errors import NotFound, NotSupported, Unrecognized
from .events import DirectMessage, Event, Target, parse_event
from .handlers import Handlers, Once
from .models import Deleted, DMInfo, NetworkInfo, Sent, Upload
from .pull import Puller
from .transport import Transport

if TYPE_CHECKING:
    from aiohttp import web

    from .events import Media

# What a reply, thread root or reaction may point at: a message the remote user sent (its
# Sent, or its message ID), a Matrix user's message (its DirectMessage, or its event ID,
# "$..."), or what an event names (its Target, e.g. ``message.thread_root``).
TargetLike = Sent | DirectMessage | Target | str
UploadSource = bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes] \
    | AsyncIterable[bytes]


def new_message_id() -> str:
    return "sdk-" + uuid.uuid4().hex


def target_json(target: TargetLike) -> dict[str, str]:
    if isinstance(target, Sent):
        return {"message_id": target.message_id}
    if isinstance(target, DirectMessage):
        return {"event_id": target.event_id}
    if isinstance(target, Target):
        # The platform's own messages by their message ID, the Matrix user's by event ID.
        if target.message_id is not None:
            return {"message_id": target.message_id}
        return {"event_id": target.event_id}
    return {"event_id": target} if target.startswith("$") else {"message_id": target}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def millis(ts: datetime | int) -> int:
    """Milliseconds since the epoch, exactly; a naive datetime is local time."""
    if isinstance(ts, datetime):
        aware = ts if ts.tzinfo is not None else ts.astimezone()
        return (aware - _EPOCH) // timedelta(milliseconds=1)
    return int(ts)


class Client(Handlers):
    """A platform's client for one network of a bridge.

    ``base_url`` is the bridge's listener (``http://127.0.0.1:29340``), ``token`` one of the
    network's ``tokens``. Use it as ``async with Client(...) as client:``, or call
    :meth:`close` when done. ``remote_id_pattern`` (a regular expression) tells a
    :class:`~dmbridge_client.Router` which remote IDs are this network's; without it the router
    asks the bridge. ``backend`` is how calls reach the bridge (HTTP to ``base_url`` unless
    given; ``dmbridge.embedded.client_for`` gives one that calls a bridge in this process).
    """

    def __init__(self, base_url: str, token: str, network: str, *,
                 remote_id_pattern: str | None = None, max_retries: int = 5,
                 max_wait: float = 60.0, timeout: float = 90.0,
                 session: aiohttp.ClientSession | None = None,
                 backend: Backend | None = None) -> None:
        super().__init__()
        self.network = network
        self.remote_id_pattern = remote_id_pattern
        self.backend: Backend = backend if backend is not None else Transport(
            base_url, token, max_retries=max_retries, max_wait=max_wait, timeout=timeout,
            session=session)
        self.once = Once()
        self.info: NetworkInfo | None = None  # the bridge's description, once asked
        self._puller: Puller | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self.backend.close()

    # --- DMs -------------------------------------------------------------------------------

    async def open_dm(self, sender: str, user_id: str, *, name: str | None = None,
                      avatar: Upload | str | None = None, new: bool = False) -> DM:
        """The DM between the remote user ``sender`` and the Matrix user ``user_id``.

        Finds the pair's DM or opens one (the user gets an invite marked direct); ``name`` sets
        the remote user's display name, ``avatar`` its picture (an image uploaded with
        :meth:`upload`). ``new=True`` is :meth:`create_dm`.

        ``created`` says whether this very request made the room: when the answer of the request
        that made it was lost, the client's retry finds the room and says ``created=False``.
        """
        if new:
            return await self.create_dm(sender, user_id, name=name, avatar=avatar)
        body: dict[str, Any] = {"sender": sender, "recipient": user_id}
        _profile(body, name, avatar)
        info = await self._call("openDM", body=body, parse=DMInfo.from_json)
        return DM(self, info)

    async def create_dm(self, sender: str, user_id: str, *, replaces: DM | str | None = None,
                        name: str | None = None, avatar: Upload | str | None = None) -> DM:
        """A fresh DM room for the pair; the previous one is no longer used.

        The pair's current DM ends (its ghost leaves it, saying the conversation continues in a
        new room; the network gets ``dm.ended`` with the reason ``replaced_by_platform``) and
        the user is invited to a new room, where every later message goes.

        The request names the room it replaces (``replaces``), so a retry after a lost answer
        finds that room replaced already and answers the new one (``created`` false) instead of
        making a third. ``replaces`` defaults to the pair's current DM; give it (the DM or its
        room ID) to call ``create_dm`` again after it raised, so the room an earlier call may
        have made is kept. With no DM to replace, the DM is opened as by :meth:`open_dm`.
        """
        if replaces is None:
            current = await self.list_dms(user_id=user_id, sender=sender, limit=1)
            if not current:
                return await self.open_dm(sender, user_id, name=name, avatar=avatar)
            replaces = current[0]
        old = replaces.room_id if isinstance(replaces, DM) else replaces
        body: dict[str, Any] = {"sender": sender, "recipient": user_id, "new": True,
                                "replaces": old}
        _profile(body, name, avatar)
        info, knows_new = await self._call(
            "openDM", body=body, parse=lambda a: (DMInfo.from_json(a), "replaced_room_id" in a))
        if not knows_new or info.room_id == old:
            raise NotSupported(
                "the bridge answered with the pair's existing DM: it does not support opening "
                "a new DM (\"new\": true); upgrade the bridge")
        return DM(self, info)

    async def list_dms(self, *, user_id: str | None = None, sender: str | None = None,
                       limit: int = 100) -> list[DM]:
        """The network's open DMs, oldest first: with a Matrix user, a remote user, or all."""
        params = {"limit": str(limit)}
        if user_id is not None:
            params["user_id"] = user_id
        if sender is not None:
            params["remote_id"] = sender
        infos: list[DMInfo] = await self._call(
            "listDMs", query=params, parse=lambda a: [DMInfo.from_json(dm) for dm in a["dms"]])
        return [DM(self, info) for info in infos]

    # --- messages --------------------------------------------------------------------------

    async def send_message(self, sender: str, user_id: str, text: str | None = None, *,
                           html: str | None = None, markdown: str | None = None,
                           media: Upload | str | None = None,
                           reply_to: TargetLike | None = None, msgtype: str | None = None,
                           name: str | None = None, avatar: Upload | str | None = None,
                           thread_root: TargetLike | None = None,
                           message_id: str | None = None,
                           ts: datetime | int | None = None) -> Sent:
        """Send ``sender``'s message to ``user_id``, in their DM (opened if there is none).

        Give ``text``, ``html`` or ``markdown`` (not both of the last two), or ``media`` with
        an optional caption; ``msgtype`` is ``text``, ``notice`` or ``emote``. ``message_id``
        is the idempotency key: one is made when none is given, and every retry of this call
        sends the same one, so the message is posted once. ``ts`` is when the message was
        really written (a datetime, naive meaning local time, or milliseconds since the
        epoch), for messages delivered late: the user's client shows that time.
        ``thread_root`` puts the message in the thread of that message (``m.thread``; pass a
        received message's ``thread_root`` to answer in its thread); with ``reply_to`` too, it
        answers that message inside the thread.
        """
        body: dict[str, Any] = {"sender": sender, "recipient": user_id}
        _content(body, text, html, markdown, msgtype)
        _profile(body, name, avatar)
        if media is not None:
            body["media"] = media.content_uri if isinstance(media, Upload) else media
        if reply_to is not None:
            body["reply_to"] = target_json(reply_to)
        if thread_root is not None:
            body["thread_root"] = target_json(thread_root)
        if ts is not None:
            body["ts"] = millis(ts)
        return await self._put_message(message_id or new_message_id(), body)

    async def _put_message(self, message_id: str, body: dict[str, Any]) -> Sent:
        sent: Sent = await self._call("sendMessage", args={"message_id": message_id}, body=body,
                                      parse=lambda a: Sent.from_json(message_id, a))
        return sent

    async def edit(self, sender: str, user_id: str, target: Sent | str,
                   text: str | None = None, *, html: str | None = None,
                   markdown: str | None = None, message_id: str | None = None) -> Sent:
        """Replace the text of ``sender``'s message ``target`` (its Sent, or its message ID)."""
        body: dict[str, Any] = {"sender": sender, "recipient": user_id,
                                "edits": target.message_id if isinstance(target, Sent)
                                else target}
        _content(body, text, html, markdown, None)
        return await self._put_message(message_id or new_message_id(), body)

    async def react(self, sender: str, user_id: str, target: TargetLike, key: str, *,
                    reaction_id: str | None = None) -> Sent:
        """React with ``key`` (an emoji) to a message in the DM; undo with :meth:`delete`."""
        reaction_id = reaction_id or new_message_id()
        body = {"sender": sender, "recipient": user_id, "target": target_json(target),
                "key": key}
        sent: Sent = await self._call("react", args={"reaction_id": reaction_id}, body=body,
                                      parse=lambda a: Sent.from_json(reaction_id, a))
        return sent

    async def delete(self, sender: str, target: Sent | str, *,
                     reason: str | None = None) -> Deleted:
        """Delete a message, edit or reaction ``sender`` sent (its Sent, or its ID)."""
        message_id = target.message_id if isinstance(target, Sent) else target
        params = {"sender": sender} | ({"reason": reason} if reason is not None else {})
        answer = await self._call("deleteMessage", args={"message_id": message_id},
                                  query=params)
        return Deleted(answer["room_id"], answer["event_id"], bool(answer["duplicate"]))

    async def set_typing(self, sender: str, user_id: str, typing: bool, *,
                         show_for: float = 30.0) -> None:
        """Show (or stop showing) ``sender`` typing in the DM, for ``show_for`` seconds."""
        body = {"sender": sender, "recipient": user_id, "typing": typing,
                "timeout_ms": max(1, min(600_000, int(show_for * 1000)))}
        await self._call("setTyping", body=body)

    async def mark_read(self, sender: str, user_id: str, event_id: str) -> None:
        """Mark the Matrix user's message ``event_id`` (and what came before) read."""
        body = {"sender": sender, "recipient": user_id, "event_id": event_id}
        await self._call("markRead", body=body)

    async def set_profile(self, sender: str, *, name: str | None = None,
                          avatar: Upload | str | None = None) -> dict[str, Any]:
        """Set the remote user's display name and picture without sending anything."""
        body: dict[str, Any] = {}
        if name is not None:
            body["name"] = name
        if avatar is not None:
            body["avatar"] = avatar.content_uri if isinstance(avatar, Upload) else avatar
        answer: dict[str, Any] = await self._call("setGhostProfile", args={"remote_id": sender},
                                                  body=body)
        return answer

    # --- files -----------------------------------------------------------------------------

    async def upload(self, data: UploadSource, *, content_type: str,
                     filename: str | None = None) -> Upload:
        """Upload a file (bytes, a path, an open binary file or an async stream of bytes).

        ``content_type`` is checked against the bytes by the bridge;
        ``application/octet-stream`` lets it tell. A path's file name is used when ``filename``
        is not given. Bytes, paths and seekable files are sent again on a retry (a file is read
        from where it stood, and left open); a stream once. A retry after a lost answer may
        store the file twice on the homeserver: the copy whose answer was lost is never used.
        """
        replayable = True
        body: Any
        if isinstance(data, bytes | bytearray | memoryview):
            body = bytes(data)
        elif isinstance(data, str | os.PathLike):
            path = Path(data)
            filename = filename or path.name
            body = functools.partial(path.open, "rb")  # read in pieces, closed when sent
        elif hasattr(data, "read"):
            stream: IO[bytes] = data  # type: ignore[assignment]
            if stream.seekable():
                body = _rewound(stream)
            else:
                body, replayable = stream, False
        else:
            body, replayable = data, False
        params = {"filename": filename} if filename else None
        upload: Upload = await self.backend.call(Call(
            "uploadMedia", self.network, query=params, content=body, content_type=content_type,
            replayable=replayable, parse=Upload.from_json))
        return upload

    async def download(self, media: Media | str) -> bytes:
        """The bytes of a Matrix user's file (``message.media``, or its ``url``)."""
        url = media if isinstance(media, str) else media.url
        if not url:
            raise NotFound(404, "M_NOT_FOUND", "the media has no link (a dead letter's copy)")
        return await self.backend.download(url)

    # --- the network -----------------------------------------------------------------------

    async def network_info(self) -> NetworkInfo:
        """What the bridge says about this network: its remote ID pattern and ghost IDs, how
        it receives events, its limits and quotas. Kept as :attr:`info`; a client given no
        ``remote_id_pattern`` takes the bridge's."""
        try:
            info: NetworkInfo = await self._call("getNetwork", parse=NetworkInfo.from_json)
        except (Unrecognized, NotFound) as e:
            raise NotSupported(
                f"the bridge does not describe its networks ({e.code}); give "
                f"remote_id_pattern= to Client({self.network!r}, ...) instead") from e
        self.info = info
        if self.remote_id_pattern is None:
            self.remote_id_pattern = self.info.remote_id_pattern
        return self.info

    async def _call(self, operation: str, *, args: dict[str, str] | None = None,
                    body: dict[str, Any] | None = None, query: dict[str, str] | None = None,
                    parse: Callable[[Any], Any] | None = None) -> Any:
        return await self.backend.call(Call(operation, self.network, args=args or {},
                                            body=body, query=query, parse=parse))

    # --- receiving -------------------------------------------------------------------------

    def event(self, raw: dict[str, Any]) -> Event:
        """The typed event for a JSON event, bound to its DM."""
        info = DMInfo(str(raw.get("room_id") or ""), str(raw.get("network", self.network)),
                      str(raw.get("remote_id", "")), str(raw.get("ghost_id", "")),
                      str(raw.get("user_id", "")))
        return parse_event(raw, DM(self, info))

    async def dispatch(self, raw: dict[str, Any]) -> bool:
        """Run the handlers of one event, once per idempotency key; False for a repeat."""
        key = str(raw.get("idempotency_key") or raw.get("id"))
        handlers = self.handlers_for(str(raw.get("type")))

        async def work() -> None:
            event = self.event(raw)  # afresh for each run: replies are numbered per run
            for handler in handlers:
                await handler(event)

        return await self.once.run(key, work)

    async def run(self, *, cursor_file: str | os.PathLike[str] | None = None,
                  wait: float = 30.0, limit: int = 100, handler_attempts: int = 5,
                  handle_signals: bool = True) -> None:
        """Pull the network's events and run the handlers until stopped.

        ``cursor_file`` keeps the place in the event stream across restarts. Each event is
        acknowledged once its handlers succeeded; a failing handler is run again with backoff,
        ``handler_attempts`` times at most. SIGINT, SIGTERM or :meth:`stop` end the loop after
        the event being handled. See :mod:`dmbridge_client.pull`.
        """
        self._puller = Puller(self, cursor_file=cursor_file, wait=wait, limit=limit,
                              handler_attempts=handler_attempts)
        try:
            await self._puller.run(handle_signals=handle_signals)
        finally:
            self._puller = None

    def stop(self) -> None:
        """End :meth:`run` after the event being handled."""
        if self._puller is not None:
            self._puller.stop()

    def webhook_app(self, secret: str, *, path: str = "/", window: int = 300
                    ) -> web.Application:
        """An aiohttp application that receives the network's webhook; see :mod:`.webhook`."""
        from .webhook import webhook_app
        return webhook_app(self, secret, path=path, window=window)


def _rewound(stream: IO[bytes]) -> Callable[[], io.RawIOBase]:
    """The stream from where it is now, each time it is sent; never closed by the sending, so
    a retry can read it again and the caller's file stays open."""
    start = stream.tell()

    def again() -> io.RawIOBase:
        stream.seek(start)
        return _Unclosed(stream)
    return again


class _Unclosed(io.RawIOBase):
    """The caller's file for one attempt: reads, seeks and its size, but closing it leaves the
    file open."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__()
        self._stream = stream

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def fileno(self) -> int:
        return self._stream.fileno()


def _content(body: dict[str, Any], text: str | None, html: str | None, markdown: str | None,
             msgtype: str | None) -> None:
    for key, value in (("text", text), ("html", html), ("markdown", markdown),
                       ("msgtype", msgtype)):
        if value is not None:
            body[key] = value


def _profile(body: dict[str, Any], name: str | None, avatar: Upload | str | None) -> None:
    if name is not None:
        body["sender_name"] = name
    if avatar is not None:
        body["sender_avatar"] = avatar.content_uri if isinstance(avatar, Upload) else avatar
