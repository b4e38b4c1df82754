"""The events a network receives (pulled or pushed), as typed values bound to their DM."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .models import Sent, Upload

if TYPE_CHECKING:
    from .dm import DM

NOTICE_TYPES = ("dm.started", "dm.user_left", "dm.declined", "dm.ended", "dm.cleared",
                "dm.forgotten")


@dataclass(frozen=True)
class Target:
    """What a reply, edit, reaction or deletion points at.

    ``message_id`` is the platform's own ID when the event came from the platform; ``kind`` is
    ``message``, ``edit``, ``reaction`` or ``unknown`` (the bridge never saw it).
    """

    event_id: str
    message_id: str | None
    kind: str

    @classmethod
    def from_json(cls, body: Any) -> Target | None:
        if not isinstance(body, dict):
            return None
        return cls(str(body.get("event_id", "")), body.get("message_id"),
                   str(body.get("kind", "unknown")))


@dataclass(frozen=True)
class Media:
    """A Matrix user's file; fetch it with ``Client.download(media)`` before ``expires_at``."""

    content_uri: str
    url: str | None
    name: str | None = None
    mimetype: str | None = None
    size: int | None = None
    width: int | None = None
    height: int | None = None
    duration_ms: int | None = None
    expires_at: int | None = None

    @classmethod
    def from_json(cls, body: Any) -> Media | None:
        if not isinstance(body, dict):
            return None
        return cls(str(body.get("content_uri", "")), body.get("url"), body.get("name"),
                   body.get("mimetype"), body.get("size"), body.get("width"),
                   body.get("height"), body.get("duration_ms"), body.get("expires_at"))


@dataclass(frozen=True)
class Event:
    """What every event has. ``dm`` is the DM it happened in, ready to ``send`` to."""

    id: int
    type: str
    idempotency_key: str
    network: str
    remote_id: str
    user_id: str
    room_id: str | None
    queued_at: int
    dm: DM = field(repr=False, compare=False)
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class DirectMessage(Event):
    """The Matrix user wrote in the DM (``message``).

    ``reply_to`` is the message it answers; ``thread_root`` the root of the thread it is in
    (its ``message_id`` is yours when the root is one of your messages), or None.
    """

    event_id: str = ""
    text: str = ""
    html: str | None = None
    msgtype: str | None = None
    sender_name: str | None = None
    media: Media | None = None
    reply_to: Target | None = None
    thread_root: Target | None = None
    sent_at: int | None = None
    # Replies made so far by this run of the handlers (each run parses the event afresh).
    _replies: list[int] = field(default_factory=lambda: [0], repr=False, compare=False)

    async def reply(self, text: str | None = None, *, html: str | None = None,
                    markdown: str | None = None, media: Upload | str | None = None,
                    msgtype: str | None = None) -> Sent:
        """Answer in the DM, as a Matrix reply to this message (in its thread, if it is in one).

        A thread whose root the bridge never saw (``kind`` ``unknown``) cannot be named to it:
        the answer is then a plain reply. The message ID comes from this message and the
        number of replies the handler made to it before, so a handler run again for the same
        message (a retry, a redelivery after a restart) posts nothing new.
        """
        self._replies[0] += 1
        count = self._replies[0]
        digest = hashlib.sha256(f"{self.idempotency_key}\n{count}".encode()).hexdigest()
        root = self.thread_root
        return await self.dm.send(text, html=html, markdown=markdown, media=media,
                                  msgtype=msgtype, reply_to=self,
                                  thread_root=root if root and root.kind != "unknown" else None,
                                  message_id=f"re-{digest[:40]}")

    async def mark_read(self) -> None:
        """Show the Matrix user that the remote user read this message."""
        await self.dm.mark_read(self.event_id)


@dataclass(frozen=True)
class Edit(Event):
    """The Matrix user edited one of their messages the network received (``edit``)."""

    event_id: str = ""
    target: Target | None = None
    text: str = ""
    html: str | None = None
    msgtype: str | None = None
    edited_at: int | None = None


@dataclass(frozen=True)
class Reaction(Event):
    """The Matrix user reacted with ``key`` (``reaction``)."""

    event_id: str = ""
    key: str = ""
    target: Target | None = None
    sent_at: int | None = None


@dataclass(frozen=True)
class Deletion(Event):
    """The Matrix user deleted a message, edit or reaction (``redaction``)."""

    event_id: str = ""
    target: Target | None = None
    reason: str | None = None
    sent_at: int | None = None


@dataclass(frozen=True)
class Typing(Event):
    """The Matrix user started (``typing`` true) or stopped typing."""

    typing: bool = False


@dataclass(frozen=True)
class ReadReceipt(Event):
    """The Matrix user read the DM up to the platform's message ``message_id``."""

    event_id: str = ""
    message_id: str | None = None
    ts: int | None = None


@dataclass(frozen=True)
class Notice(Event):
    """A change in the DM's life (``dm.started``, ``dm.declined``, ...).

    ``state`` is the DM's state after it, ``reason`` why, ``event_id`` the Matrix event that
    caused it (or None).
    """

    state: str = ""
    reason: str = ""
    event_id: str | None = None


@dataclass(frozen=True)
class DeliveryFailed(Event):
    """An earlier event became a dead letter (``delivery.failed``)."""

    failed_id: int = 0
    failed_type: str = ""
    failed_key: str = ""
    attempts: int = 0
    error: str = ""


def parse_event(raw: dict[str, Any], dm: DM) -> Event:
    """The typed event for a JSON event; an unknown type gives a plain :class:`Event`."""
    base: dict[str, Any] = dict(
        id=int(raw.get("id", 0)), type=str(raw.get("type", "")),
        idempotency_key=str(raw.get("idempotency_key", raw.get("id", ""))),
        network=str(raw.get("network", "")), remote_id=str(raw.get("remote_id", "")),
        user_id=str(raw.get("user_id", "")), room_id=raw.get("room_id"),
        queued_at=int(raw.get("queued_at") or 0), dm=dm, raw=raw)
    kind = base["type"]
    body = raw.get("dm" if kind.startswith("dm.") else _BODY.get(kind, kind))
    part: dict[str, Any] = body if isinstance(body, dict) else {}
    if kind == "message":
        sender = part.get("sender")
        return DirectMessage(
            **base, event_id=str(part.get("event_id", "")), text=str(part.get("text") or ""),
            html=part.get("html"), msgtype=part.get("msgtype"),
            sender_name=sender.get("displayname") if isinstance(sender, dict) else None,
            media=Media.from_json(part.get("media")),
            reply_to=Target.from_json(part.get("reply_to")),
            thread_root=Target.from_json(part.get("thread_root")), sent_at=part.get("sent_at"))
    if kind == "edit":
        return Edit(**base, event_id=str(part.get("event_id", "")),
                    target=Target.from_json(part.get("target")),
                    text=str(part.get("text") or ""), html=part.get("html"),
                    msgtype=part.get("msgtype"), edited_at=part.get("edited_at"))
    if kind == "reaction":
        return Reaction(**base, event_id=str(part.get("event_id", "")),
                        key=str(part.get("key", "")), target=Target.from_json(part.get("target")),
                        sent_at=part.get("sent_at"))
    if kind == "redaction":
        return Deletion(**base, event_id=str(part.get("event_id", "")),
                        target=Target.from_json(part.get("target")), reason=part.get("reason"),
                        sent_at=part.get("sent_at"))
    if kind == "typing":
        return Typing(**base, typing=bool(raw.get("typing")))
    if kind == "read":
        return ReadReceipt(**base, event_id=str(part.get("event_id", "")),
                           message_id=part.get("message_id"), ts=part.get("ts"))
    if kind in NOTICE_TYPES or kind.startswith("dm."):
        return Notice(**base, state=str(part.get("state", "")),
                      reason=str(part.get("reason", "")), event_id=part.get("event_id"))
    if kind == "delivery.failed":
        return DeliveryFailed(**base, failed_id=int(part.get("id", 0)),
                              failed_type=str(part.get("type", "")),
                              failed_key=str(part.get("idempotency_key", "")),
                              attempts=int(part.get("attempts", 0)),
                              error=str(part.get("error", "")))
    return Event(**base)


_BODY = {"delivery.failed": "failed"}
