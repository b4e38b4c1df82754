"""What the API answers, as typed values."""

from __future__ import annotations

import re
from dataclasses import dataclass
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
    """One DM room between a remote user's ghost and a Matrix user.

    ``created`` is true when the request that answered made the room; ``replaced_room_id`` the
    room a fresh DM (``create_dm``) ended, or None.
    """

    room_id: str
    network: str
    remote_id: str
    ghost_id: str
    user_id: str
    user_membership: str | None = None
    state: str = "active"
    created: bool = False
    replaced_room_id: str | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> DMInfo:
        return cls(body["room_id"], body["network"], body["remote_id"], body["ghost_id"],
                   body["user_id"], body.get("user_membership"), body.get("state", "active"),
                   bool(body.get("created", False)), body.get("replaced_room_id"))


@dataclass(frozen=True)
class Limits:
    """What one request may hold (the README's "Request limits")."""

    max_body_bytes: int
    max_id_chars: int
    max_text_chars: int
    max_event_bytes: int
    max_upload_bytes: int
    max_reaction_key_chars: int
    pull_max_wait_s: float
    ts_max_ahead_ms: int
    ts_earliest_ms: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Limits:
        return cls(int(body["max_body_bytes"]), int(body["max_id_chars"]),
                   int(body["max_text_chars"]), int(body["max_event_bytes"]),
                   int(body["max_upload_bytes"]), int(body["max_reaction_key_chars"]),
                   float(body["pull_max_wait_s"]), int(body["ts_max_ahead_ms"]),
                   int(body["ts_earliest_ms"]))


@dataclass(frozen=True)
class Quotas:
    """The network's quotas per bridge process; 0 is none. Past one: ``QuotaExceeded``."""

    messages_per_second: float
    message_burst: int
    new_dms_per_hour: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Quotas:
        return cls(float(body["messages_per_second"]), int(body["message_burst"]),
                   int(body["new_dms_per_hour"]))


@dataclass(frozen=True)
class NetworkInfo:
    """What the bridge says about a network (``GET /networks/{network}``).

    ``remote_id_pattern`` is the regular expression a remote ID must match in full;
    ``ghost_user_id_template`` a ghost's user ID with ``{remote_id}`` for the escaped remote
    ID (see :meth:`ghost_user_id`); ``delivery_mode`` is ``pull`` or ``webhook``.
    """

    network: str
    name: str
    api_version: str
    bridge_version: str
    remote_id_pattern: str
    ghost_user_id_template: str
    ghost_displayname_template: str
    delivery_mode: str
    limits: Limits
    quotas: Quotas

    def matches(self, remote_id: str) -> bool:
        """Whether ``remote_id`` is an ID of this network (the bridge would accept it)."""
        return re.fullmatch(self.remote_id_pattern, remote_id) is not None

    def ghost_user_id(self, remote_id: str) -> str:
        """The Matrix user ID of ``remote_id``'s ghost, as the bridge names it."""
        return self.ghost_user_id_template.replace("{remote_id}", escape_remote_id(remote_id))

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> NetworkInfo:
        return cls(str(body["network"]), str(body["name"]), str(body["api_version"]),
                   str(body["bridge_version"]), str(body["remote_id_pattern"]),
                   str(body["ghost_user_id_template"]), str(body["ghost_displayname_template"]),
                   str(body["delivery"]["mode"]), Limits.from_json(body["limits"]),
                   Quotas.from_json(body["quotas"]))


_KEPT = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-/")


def escape_remote_id(remote_id: str) -> str:
    """A remote ID as it appears in its ghost's user ID: ``a-z 0-9 . - /`` kept, ``_`` as
    ``__``, an upper-case letter as ``_`` and the letter, any other byte as ``=`` and two hex
    digits."""
    parts: list[str] = []
    for char in remote_id:
        if char in _KEPT:
            parts.append(char)
        elif char == "_":
            parts.append("__")
        elif "A" <= char <= "Z":
            parts.append("_" + char.lower())
        else:
            parts.extend(f"={byte:02x}" for byte in char.encode())
    return "".join(parts)
