"""What the platform gets for a Matrix user's event in a DM: a message, edit, reaction or
deletion, pointing at the events of the DM the platform knows."""

from __future__ import annotations

import logging
from typing import Any

from mautrix.types import EventID
from mautrix.util.async_db import Connection

from . import payloads
from .db import Stores
from .db.dm import DMRecord
from .db.message import EDIT, MESSAGE, REACTION, MatrixMessage

log = logging.getLogger("dmbridge.lifecycle")


def lane_of(dm: DMRecord) -> payloads.Lane:
    return payloads.Lane(dm.network, dm.remote_id, dm.user_id, dm.ghost_id)


class Outgoing:
    """The payloads of a DM user's events, read in the transaction that records them."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores

    async def payload(self, conn: Connection, dm: DMRecord, raw: dict[str, Any], now: int
                      ) -> tuple[dict[str, Any] | None, MatrixMessage | None]:
        """The platform's payload for a user's event, and its row in the message map."""
        room_id = dm.room_id
        assert room_id is not None
        kind, content = raw.get("type"), raw["content"]
        lane, event_id = lane_of(dm), EventID(str(raw["event_id"]))
        relates = content.get("m.relates_to")
        relates = relates if isinstance(relates, dict) else {}

        def mapped(what: str, target: str | None = None, key: str | None = None
                   ) -> MatrixMessage:
            return MatrixMessage(event_id, room_id, dm.network, dm.remote_id, dm.user_id,
                                 what, EventID(target) if target else None, key)

        if kind == "m.room.redaction":
            redacts = _event_ref(content.get("redacts", raw.get("redacts")))  # content: v11+
            of = await self.target(conn, dm, redacts) if redacts else None
            if of is None:
                log.info("%s: redaction %s of %s not delivered: the platform never had it",
                         dm.room_id, event_id, redacts)
                return None, None
            reason = content.get("reason") if isinstance(content.get("reason"), str) else None
            assert redacts is not None
            if of["message_id"] is not None:
                await self.stores.messages.redacted_by_user(conn, dm.network, dm.remote_id,
                                                            redacts, now)
            else:
                await self.stores.matrix_messages.redacted(conn, redacts, now)
            return payloads.redaction(lane, room_id, raw, of, reason, now), None
        if kind == "m.reaction":
            target, key = _event_ref(relates.get("event_id")), relates.get("key")
            if relates.get("rel_type") != "m.annotation" or target is None or (
                    not isinstance(key, str)) or "\x00" in key or len(key) > 1000:
                log.info("%s: reaction %s is malformed; not delivered", dm.room_id, event_id)
                return None, None
            to = await self.target(conn, dm, target) or payloads.target(target, None, "unknown")
            return (payloads.reaction(lane, room_id, raw, key, to, now),
                    mapped(REACTION, target, key))
        new_content = content.get("m.new_content")
        if relates.get("rel_type") == "m.replace" and isinstance(new_content, dict):
            target = _event_ref(relates.get("event_id")) or "$unknown"
            if await self.stores.messages.by_event(conn, dm.network, dm.remote_id, target):
                # Only a message's sender may edit it (the spec); clients ignore this one too.
                log.info("%s: %s tried to edit the contact's message %s; ignored", room_id,
                         dm.user_id, target)
                return None, None
            original = await self.stores.matrix_messages.get_in(conn, target)
            if original is not None and original.of_dm(dm.network, dm.remote_id, dm.user_id):
                return (payloads.edit(lane, room_id, raw, new_content, target, now),
                        mapped(EDIT, target))
            # The platform never had the original: the edited text arrives as a message.
            return (payloads.message(lane, room_id, raw, dm.user_displayname, now,
                                     content=new_content), mapped(MESSAGE))
        in_reply_to = relates.get("m.in_reply_to")
        reply_to = thread_root = None
        answered = _event_ref(in_reply_to.get("event_id")) if isinstance(
            in_reply_to, dict) else None
        root = _event_ref(relates.get("event_id")) if relates.get(
            "rel_type") == "m.thread" else None
        if root is not None:
            thread_root = await self.target(conn, dm, root) or payloads.target(
                root, None, "unknown")
            if relates.get("is_falling_back") is True:
                answered = None  # a reply only for clients without threads
        if answered is not None:
            reply_to = await self.target(conn, dm, answered) or payloads.target(
                answered, None, "unknown")
        return (payloads.message(lane, room_id, raw, dm.user_displayname, now,
                                 reply_to=reply_to, thread_root=thread_root), mapped(MESSAGE))

    async def target(self, conn: Connection, dm: DMRecord, event_id: str
                      ) -> dict[str, Any] | None:
        """An event of this DM the platform knows: one it sent, or one it was given."""
        sent = await self.stores.messages.by_event(conn, dm.network, dm.remote_id, event_id)
        if sent is not None:
            return payloads.target(event_id, *sent)
        known = await self.stores.matrix_messages.get_in(conn, event_id)
        if known is not None and known.of_dm(dm.network, dm.remote_id, dm.user_id):
            return payloads.target(event_id, None, known.kind)
        return None


def _event_ref(value: object) -> str | None:
    """An event ID the databases can look up; anything else points at nothing known."""
    if isinstance(value, str) and value.startswith("$") and len(value) <= 255 and (
            "\x00" not in value):
        return value
    return None
