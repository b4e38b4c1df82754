"""What platforms receive: one JSON shape for messages and notices, pushed or pulled."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .formatting import HTML_FORMAT, sanitize
from .media import MXC

MESSAGE = "message"
DM_STARTED = "dm.started"  # the Matrix user started (or resumed) a conversation
DM_USER_LEFT = "dm.user_left"  # the user left; the next message re-invites or opens a room
DM_DECLINED = "dm.declined"  # the user turned the contact down: sends fail until they return
DM_ENDED = "dm.ended"  # the room is no longer a DM; the next message opens a new one
DM_CLEARED = "dm.cleared"  # an admin lifted a decline
DM_FORGOTTEN = "dm.forgotten"  # an admin made the bridge forget the DM (dmbridge forget)
DELIVERY_FAILED = "delivery.failed"  # an earlier item became a dead letter
TYPING = "typing"  # the Matrix user started or stopped typing in the DM
READ = "read"  # the Matrix user read the DM up to one of the platform's messages
EDIT = "edit"  # the Matrix user edited one of their messages
REACTION = "reaction"  # the Matrix user reacted to a message
REDACTION = "redaction"  # the Matrix user deleted a message or took a reaction back
# The Matrix user wrote an encrypted message the bridge could not decrypt (README: "Encrypted
# DMs"); the user was told in the room that the contact did not receive it.
UNDECRYPTABLE = "message.undecryptable"

MEDIA_MSGTYPES = frozenset({"m.image", "m.file", "m.audio", "m.video"})
MAX_SAFE_INTEGER = 2**53 - 1  # what a JavaScript platform reads exactly
_REPLY_HTML = re.compile(r"^\s*<mx-reply>.*?</mx-reply>", re.DOTALL)


@dataclass(frozen=True)
class Lane:
    """The conversation an item belongs to; items of one lane are delivered in order."""

    network: str
    remote_id: str
    user_id: str
    ghost_id: str

    def envelope(self, type_: str, key: str, room_id: str | None, now: int) -> dict[str, Any]:
        return {
            "type": type_,
            "idempotency_key": key,
            "network": self.network,
            "remote_id": self.remote_id,
            "ghost_id": self.ghost_id,
            "user_id": self.user_id,
            "room_id": room_id,
            "queued_at": now,
        }


def message(lane: Lane, room_id: str, raw: dict[str, Any], displayname: str | None,
            now: int, *, reply_to: dict[str, Any] | None = None,
            content: dict[str, Any] | None = None,
            thread_root: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Matrix user's message, as the platform receives it.

    ``content`` replaces the event's own (an edit of a message the platform never got arrives
    as a message with the edited content); ``reply_to`` names the message it answers,
    ``thread_root`` the root of the thread it is in.
    """
    if content is None:
        content = raw.get("content") if isinstance(raw.get("content"), dict) else {}
    assert isinstance(content, dict)
    event_id = str(raw["event_id"])
    return {
        **lane.envelope(MESSAGE, event_id, room_id, now),
        "message": {
            "event_id": event_id,
            "sender": {"user_id": lane.user_id, "displayname": displayname},
            "recipient": lane.remote_id,
            **_text_of(content, raw.get("type") == "m.sticker", reply_to is not None),
            "media": _media_of(content),
            "reply_to": reply_to,
            "thread_root": thread_root,
            "sent_at": timestamp(raw.get("origin_server_ts")),
        },
    }


def _text_of(content: dict[str, Any], sticker: bool = False, is_reply: bool = False
             ) -> dict[str, Any]:
    """msgtype, text and cleaned html; a media message's text is its caption (or "")."""
    msgtype = "m.sticker" if sticker else content.get("msgtype")
    html = content.get("formatted_body")
    if content.get("format") != HTML_FORMAT or not isinstance(html, str):
        html = None
    else:  # whatever a Matrix client sent, the platform gets no scripts or styles
        html = sanitize(_REPLY_HTML.sub("", html) if is_reply else html) or None
    raw_body = content.get("body")
    body = raw_body if isinstance(raw_body, str) else ""
    if is_reply:
        body = _strip_reply_fallback(body)
    if msgtype in MEDIA_MSGTYPES:  # a sticker's body describes it: that stays its text
        filename = content.get("filename")
        body = body if isinstance(filename, str) and body != filename else ""
        html = html if body else None
    return {"msgtype": msgtype if isinstance(msgtype, str) else None, "text": body, "html": html}


def _strip_reply_fallback(body: str) -> str:
    """Older clients quote the message they answer ("> <@user> text" lines, then a blank)."""
    lines = body.split("\n")
    if not lines or not lines[0].startswith("> <"):
        return body
    i = 0
    while i < len(lines) and lines[i].startswith(">"):
        i += 1
    return "\n".join(lines[i + 1 if i < len(lines) and not lines[i] else i:])


def _media_of(content: dict[str, Any]) -> dict[str, Any] | None:
    """A Matrix user's file, image, video or audio; the link is added as it is handed out."""
    url = content.get("url")
    if not isinstance(url, str) or not MXC.fullmatch(url):
        return None  # not media, or encrypted media the bridge cannot read
    info = content.get("info") if isinstance(content.get("info"), dict) else {}
    assert isinstance(info, dict)

    def number(key: str) -> int | None:
        return timestamp(info.get(key))  # a count: the same rules as a timestamp

    name = content.get("filename") if isinstance(content.get("filename"), str) else (
        content.get("body") if isinstance(content.get("body"), str)
        and content.get("msgtype") in MEDIA_MSGTYPES else None)
    mimetype = info.get("mimetype")
    return {
        "content_uri": url,
        "name": name,
        "mimetype": mimetype if isinstance(mimetype, str) else None,
        "size": number("size"),
        "width": number("w"),
        "height": number("h"),
        "duration_ms": number("duration"),
    }


def timestamp(value: object) -> int | None:
    """A homeserver's number as platforms get it: a non-negative safe integer, or null."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SAFE_INTEGER:
        return value
    return None


def undecryptable(lane: Lane, room_id: str, raw: dict[str, Any], reason: str, now: int
                  ) -> dict[str, Any]:
    """An encrypted message of the user that the platform cannot be given."""
    event_id = str(raw["event_id"])
    return {**lane.envelope(UNDECRYPTABLE, f"{UNDECRYPTABLE}:{event_id}", room_id, now),
            UNDECRYPTABLE: {"event_id": event_id, "reason": reason,
                            "sent_at": timestamp(raw.get("origin_server_ts"))}}


def target(event_id: str, message_id: str | None, kind: str = "message") -> dict[str, Any]:
    """What a relation points at: the event, and the platform's own ID if it sent it."""
    return {"event_id": event_id, "message_id": message_id, "kind": kind}


def edit(lane: Lane, room_id: str, raw: dict[str, Any], new_content: dict[str, Any],
         target_event_id: str, now: int) -> dict[str, Any]:
    event_id = str(raw["event_id"])
    return {
        **lane.envelope(EDIT, event_id, room_id, now),
        "edit": {"event_id": event_id, "target": target(target_event_id, None),
                 **_text_of(new_content), "edited_at": timestamp(raw.get("origin_server_ts"))},
    }


def reaction(lane: Lane, room_id: str, raw: dict[str, Any], key: str, to: dict[str, Any],
             now: int) -> dict[str, Any]:
    event_id = str(raw["event_id"])
    return {
        **lane.envelope(REACTION, event_id, room_id, now),
        "reaction": {"event_id": event_id, "key": key, "target": to,
                     "sent_at": timestamp(raw.get("origin_server_ts"))},
    }


def redaction(lane: Lane, room_id: str, raw: dict[str, Any], of: dict[str, Any],
              reason: str | None, now: int) -> dict[str, Any]:
    event_id = str(raw["event_id"])
    return {
        **lane.envelope(REDACTION, event_id, room_id, now),
        "redaction": {"event_id": event_id, "target": of, "reason": reason,
                      "sent_at": timestamp(raw.get("origin_server_ts"))},
    }


def notice(lane: Lane, type_: str, room_id: str | None, state: str, reason: str,
           event_id: str | None, now: int, key: str | None = None) -> dict[str, Any]:
    """A change in the DM's life. Its key is stable, so a re-processed event queues nothing;
    a change no event caused may name its own ``key`` for that."""
    if key is None:
        key = f"{type_}:{event_id}" if event_id else f"{type_}:{lane.network}:" \
            f"{lane.remote_id}:{lane.user_id}:{now}"
    return {
        **lane.envelope(type_, key, room_id, now),
        "dm": {"state": state, "reason": reason, "event_id": event_id},
    }


def forgotten(lane: Lane, room_id: str | None, now: int) -> dict[str, Any]:
    """The DM and what the bridge kept of it are being deleted. Its key names the room, so a
    forget run again (after a failure) queues nothing new."""
    key = f"{DM_FORGOTTEN}:{lane.network}:{lane.remote_id}:{lane.user_id}:{room_id or ''}"
    return {
        **lane.envelope(DM_FORGOTTEN, key, room_id, now),
        "dm": {"state": "ended", "reason": "forgotten_by_admin", "event_id": None},
    }


def typing(lane: Lane, room_id: str, is_typing: bool, now: int) -> dict[str, Any]:
    key = f"{TYPING}:{room_id}:{lane.user_id}:{now}:{int(is_typing)}"
    return {**lane.envelope(TYPING, key, room_id, now), "typing": is_typing}


def read(lane: Lane, room_id: str, event_id: str, message_id: str, ts: Any, now: int
         ) -> dict[str, Any]:
    key = f"{READ}:{event_id}:{lane.user_id}"
    return {
        **lane.envelope(READ, key, room_id, now),
        "read": {"event_id": event_id, "message_id": message_id,
                 "ts": timestamp(ts)},
    }


def delivery_failed(lane: Lane, failed: dict[str, Any], attempts: int, error: str,
                    now: int) -> dict[str, Any]:
    """Tells the platform that an item (``failed``, as it would have received it) is dead."""
    key = f"{DELIVERY_FAILED}:{failed['idempotency_key']}:{now}"
    return {
        **lane.envelope(DELIVERY_FAILED, key, failed.get("room_id"), now),
        "failed": {
            "id": failed.get("id"),
            "type": failed.get("type"),
            "idempotency_key": failed.get("idempotency_key"),
            "attempts": attempts,
            "error": error,
        },
    }
