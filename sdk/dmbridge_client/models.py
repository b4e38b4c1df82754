"""What the API answers, as typed values."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sent:
    """A message, edit or reaction the bridge posted (or had posted: ``duplicate``)."""

    message_id: str
    room_id: str
    event_id: str
    room_created: bool = False
    duplicate: bool = False

    @classmethod
    def from_json(cls, message_id: str, body: dict[str, Any]) -> Sent:
        return cls(message_id, body["room_id"], body["event_id"],
                   bool(body.get("room_created", False)), bool(body.get("duplicate", False)))


@dataclass(frozen=True)
class Deleted:
    """A deletion: ``event_id`` is the redaction's."""

    room_id: str
    event_id: str
    duplicate: bool


@dataclass(frozen=True)
class Upload:
    """A file in the homeserver's media repository, ready to send as ``media=``."""

    content_uri: str
    mimetype: str
    size: int
    filename: str | None = None
    width: int | None = None
    height: int | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Upload:
        return cls(body["content_uri"], body["mimetype"], int(body["size"]),
                   body.get("filename"), body.get("width"), body.get("height"))


@dataclass(frozen=True)
class DMInfo:
    """One DM room between a remote user's ghost and a Matrix user."""

    room_id: str
    network: str
    remote_id: str
    ghost_id: str
    user_id: str
    user_membership: str | None = None
    state: str = "active"
    created: bool = False

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> DMInfo:
        return cls(body["room_id"], body["network"], body["remote_id"], body["ghost_id"],
                   body["user_id"], body.get("user_membership"), body.get("state", "active"),
                   bool(body.get("created", False)))


@dataclass(frozen=True)
class NetworkInfo:
    """What the bridge says about a network: how its remote IDs look, how it receives events."""

    network: str
    remote_id_pattern: str
    ghost_id_template: str | None = None
    delivery_mode: str | None = None
    limits: dict[str, Any] = field(default_factory=dict)

    def matches(self, remote_id: str) -> bool:
        return re.fullmatch(self.remote_id_pattern, remote_id) is not None

    @classmethod
    def from_json(cls, network: str, body: dict[str, Any]) -> NetworkInfo:
        delivery = body.get("delivery")
        mode = delivery.get("mode") if isinstance(delivery, dict) else body.get("delivery_mode")
        limits = body.get("limits")
        return cls(str(body.get("network", body.get("id", network))),
                   str(body["remote_id_pattern"]),
                   body.get("ghost_id_template", body.get("ghost_localpart")),
                   mode, limits if isinstance(limits, dict) else {})
