"""Replies, edits and reactions from platforms: finding the Matrix event a platform points at.

A platform names a target by its own ``message_id`` (a message it sent through the bridge) or
by the ``event_id`` it was given for a Matrix user's message. Either way the target must be a
message of the pair's current DM room; anything else is a precise error, never a guess.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

from mautrix.errors import MatrixRequestError
from mautrix.types import EventID, RoomID

from .db import Stores
from .db.message import MESSAGE
from .errors import BadRequest, BridgeError, Forbidden, InvalidParam, NotFound, storable

MAX_REACTION_KEY = 64
_INVISIBLE = frozenset({"Cf", "Mn", "Me", "Zs", "Zl", "Zp"})


class TargetElsewhere(BridgeError):
    """The target lives in an earlier DM room between the pair, not the current one."""

    status = 409
    errcode = "DMBRIDGE_TARGET_IN_OTHER_ROOM"


class DuplicateReaction(BridgeError):
    """The sender already reacted to that message with that key (under another ID)."""

    status = 409
    errcode = "DMBRIDGE_DUPLICATE_REACTION"


class GhostNotInRoom(BridgeError):
    """The message lives in a room the ghost has left; nothing can be changed there."""

    status = 409
    errcode = "DMBRIDGE_GHOST_NOT_IN_ROOM"


class NotYours(Forbidden):
    errcode = "DMBRIDGE_NOT_YOUR_MESSAGE"


@dataclass(frozen=True)
class Target:
    """What a platform points at: one of its own messages, or a Matrix user's event."""

    message_id: str | None = None
    event_id: str | None = None

    @classmethod
    def parse(cls, body: dict[str, Any], key: str) -> Target | None:
        value = body.get(key)
        if value is None:
            return None
        if not isinstance(value, dict) or len(value) != 1 or not (
            set(value) <= {"message_id", "event_id"}
        ):
            raise BadRequest(f"'{key}' must be {{\"message_id\": ...}} (a message you sent) or "
                             f"{{\"event_id\": ...}} (a Matrix user's message you received)")
        (field, ident), = value.items()
        if not isinstance(ident, str) or not 0 < len(ident) <= 255:
            raise BadRequest(f"'{key}.{field}' must be a string of 1 to 255 characters")
        return cls(**{field: storable(ident, f"{key}.{field}")})

    def __str__(self) -> str:
        return f"message {self.message_id}" if self.message_id else f"event {self.event_id}"


@dataclass(frozen=True)
class Resolved:
    event_id: EventID
    room_id: RoomID
    by_sender: bool  # the remote user sent it through the bridge (else: the Matrix user did)


async def resolve(stores: Stores, network: str, remote_id: str, user_id: str, target: Target,
                  *, purpose: str) -> Resolved:
    """The event behind ``target`` in the DM of (network, remote_id, user_id).

    ``purpose`` ("reply to", "edit", "react to") words the errors. Only messages can be
    targets: not reactions, edits, or messages already deleted.
    """
    if target.message_id is not None:
        sent = await stores.messages.get(network, remote_id, target.message_id)
        if sent is None:
            if purpose == "edit" and await stores.messages.sender_of(network, target.message_id):
                raise NotYours(f"message {target.message_id} was sent by another {network} user;"
                               " only its sender can edit it")
            if purpose == "edit" and await _received_in_dm(stores, network, remote_id, user_id,
                                                           target.message_id):
                # The event ID of a Matrix user's message, given where a message ID belongs.
                raise NotYours(f"{target.message_id} was sent by {user_id}; only its sender can"
                               " edit it")
            raise NotFound(f"{remote_id} sent no message {target.message_id} through the bridge;"
                           f" there is nothing to {purpose}")
        if sent.kind != MESSAGE:
            raise InvalidParam(f"{target} is {with_article(sent.kind)}, not a message;"
                               f" cannot {purpose} it")
        dm = await stores.dms.by_room(stores.db, sent.room_id)  # type: ignore[arg-type]
        if dm is not None and dm.user_id != user_id:
            raise NotFound(f"{target} was sent to {dm.user_id}, not {user_id}; there is nothing"
                           f" to {purpose} in this DM")
        if sent.redacted_at is not None:
            raise NotFound(f"{target} was deleted; cannot {purpose} it")
        return Resolved(sent.event_id, sent.room_id, by_sender=True)
    assert target.event_id is not None
    received = await stores.matrix_messages.get(target.event_id)
    if received is None or not received.of_dm(network, remote_id, user_id):
        raise NotFound(f"{target.event_id} is not a message {remote_id} received from {user_id};"
                       f" there is nothing to {purpose}")
    if purpose == "edit":
        raise NotYours(f"{target.event_id} was sent by {user_id}; only its sender can edit it")
    if received.redacted_at is not None:
        raise NotFound(f"{target} was deleted; cannot {purpose} it")
    if received.kind != MESSAGE:
        raise InvalidParam(f"{target} is {with_article(received.kind)}, not a message;"
                           f" cannot {purpose} it")
    return Resolved(received.event_id, received.room_id, by_sender=False)


async def _received_in_dm(stores: Stores, network: str, remote_id: str, user_id: str,
                          event_id: str) -> bool:
    """Was ``event_id`` a Matrix user's event given to this DM's platform?"""
    if not event_id.startswith("$"):
        return False
    received = await stores.matrix_messages.get(event_id)
    return received is not None and received.of_dm(network, remote_id, user_id)


def with_article(kind: str) -> str:
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


IN_THREAD = "reply in the thread of"  # the purpose of a thread root
_PASSIVE = {"reply to": "replied to", "edit": "edited", "react to": "reacted to",
            IN_THREAD: "replied to in a thread"}


def check_room(resolved: Resolved, room_id: RoomID | None, target: Target, purpose: str
               ) -> None:
    """The target must be in the pair's current DM room (checked before a room is opened)."""
    if resolved.room_id != room_id:
        now = f"the pair's DM is now {room_id}" if room_id else "the pair has no open DM now"
        raise TargetElsewhere(
            f"{target} is in an earlier DM room ({resolved.room_id}); {now}, so it can no"
            f" longer be {_PASSIVE.get(purpose, purpose)}"
        )


def reply_content(content: dict[str, Any], target: EventID) -> dict[str, Any]:
    return {**content, "m.relates_to": {"m.in_reply_to": {"event_id": target}}}


def thread_content(content: dict[str, Any], root: EventID, reply_to: EventID | None
                   ) -> dict[str, Any]:
    """A message in the thread of ``root`` (``m.thread``). Clients without threads see a reply:
    to ``reply_to`` when the message answers one, else (marked ``is_falling_back``) to the
    root, the latest thread message the bridge can name."""
    return {**content, "m.relates_to": {
        "rel_type": "m.thread", "event_id": root, "is_falling_back": reply_to is None,
        "m.in_reply_to": {"event_id": reply_to or root},
    }}


def thread_refused(e: BaseException) -> bool:
    """The homeserver's answer when a thread's root relates to another event itself (it is
    in a thread): Synapse's 400 "Cannot start threads from an event with a relation"."""
    cause = e.__cause__
    return (isinstance(cause, MatrixRequestError) and getattr(cause, "http_status", None) == 400
            and "Cannot start threads" in (cause.message or ""))


def edit_content(new: dict[str, Any], target: EventID) -> dict[str, Any]:
    """An m.replace: the full new content, and a '* ' fallback for clients without edits."""
    content: dict[str, Any] = {**new, "body": f"* {new['body']}"}
    if "formatted_body" in new:
        content["formatted_body"] = f"* {new['formatted_body']}"
    content["m.new_content"] = new
    content["m.relates_to"] = {"rel_type": "m.replace", "event_id": target}
    return content


def reaction_content(key: str, target: EventID) -> dict[str, Any]:
    return {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}}


def check_reaction_key(key: object) -> str:
    if not isinstance(key, str) or not key.strip():
        raise BadRequest("'key' must be a non-empty string (an emoji, usually)")
    categories = [unicodedata.category(c) for c in key]
    # Joiners and variation selectors belong in emoji; control characters never do, and a
    # key of nothing but invisible characters shows nothing.
    if len(key) > MAX_REACTION_KEY or any(c in ("Cc", "Cs", "Co", "Cn") for c in categories) or (
            all(c in _INVISIBLE for c in categories)):
        raise InvalidParam(f"'key' must be at most {MAX_REACTION_KEY} printable characters")
    return key
