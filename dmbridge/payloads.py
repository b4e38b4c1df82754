"""What platforms receive: one JSON shape for messages and notices, pushed or pulled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .formatting import HTML_FORMAT, sanitize

MESSAGE = "message"
DM_STARTED = "dm.started"  # the Matrix user started (or resumed) a conversation
DM_USER_LEFT = "dm.user_left"  # the user left; the next message re-invites or opens a room
DM_DECLINED = "dm.declined"  # the user turned the contact down: sends fail until they return
DM_ENDED = "dm.ended"  # the room is no longer a DM; the next message opens a new one
DM_CLEARED = "dm.cleared"  # an admin lifted a decline
DELIVERY_FAILED = "delivery.failed"  # an earlier item became a dead letter
TYPING = "typing"  # the Matrix user started or stopped typing in the DM
READ = "read"  # the Matrix user read the DM up to one of the platform's messages


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
            now: int) -> dict[str, Any]:
    """A Matrix user's message, as the platform receives it."""
    content = raw.get("content") if isinstance(raw.get("content"), dict) else {}
    assert isinstance(content, dict)
    html = content.get("formatted_body")
    if content.get("format") != HTML_FORMAT or not isinstance(html, str):
        html = None
    else:  # whatever a Matrix client sent, the platform gets no scripts or styles
        html = sanitize(html) or None
    body = content.get("body")
    event_id = str(raw["event_id"])
    return {
        **lane.envelope(MESSAGE, event_id, room_id, now),
        "message": {
            "event_id": event_id,
            "sender": {"user_id": lane.user_id, "displayname": displayname},
            "recipient": lane.remote_id,
            "msgtype": content.get("msgtype") if isinstance(content.get("msgtype"), str) else None,
            "text": body if isinstance(body, str) else "",
            "html": html,
            "sent_at": raw.get("origin_server_ts"),
        },
    }


def notice(lane: Lane, type_: str, room_id: str | None, state: str, reason: str,
           event_id: str | None, now: int) -> dict[str, Any]:
    """A change in the DM's life. Its key is stable, so a re-processed event queues nothing."""
    key = f"{type_}:{event_id}" if event_id else f"{type_}:{lane.network}:{lane.remote_id}:" \
        f"{lane.user_id}:{now}"
    return {
        **lane.envelope(type_, key, room_id, now),
        "dm": {"state": state, "reason": reason, "event_id": event_id},
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
                 "ts": ts if isinstance(ts, int) else None},
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
