"""Reading and checking request bodies: size-limited, JSON objects, typed fields.

The fields each operation reads are declared here, once (``BODY_FIELDS``, ``QUERY_FIELDS``,
``FLAGS``, ``INTEGERS``, ``NUMBERS``); the handlers read them through these declarations, and a
unit test (tests/unit/test_api_contract.py) checks that openapi.yaml states the same names,
types and limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import jsontext
from ..errors import BadRequest, NotJSON, TooLarge, storable

# Request bodies of this API nest three levels at most; anything far deeper is an attack.
MAX_JSON_DEPTH = 32
ID_MAX = 255  # IDs, names and URIs, in characters
TEXT_MAX = 65536  # message text, in characters
MAX_IDS = 1000
MAX_ID = 2**62 - 1  # outbox IDs: far beyond any real count, and exact in every language


async def read_object(request: web.Request, limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the request body is {request.content_length} bytes; the limit is {limit}")
    data = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        data += chunk
        if len(data) > limit:
            raise TooLarge(f"the request body exceeds the limit of {limit} bytes")
    try:
        body = jsontext.loads(bytes(data), MAX_JSON_DEPTH)
    except jsontext.TooDeep:
        raise BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:  # UnicodeDecodeError included: JSON is UTF-8, whatever the charset says
        raise NotJSON("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def string(body: Mapping[str, Any], key: str, *, required: bool = True, max_len: int = 65536
           ) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise BadRequest(f"'{key}' is required")
        return None
    if not isinstance(value, str) or (required and not value):
        raise BadRequest(f"'{key}' must be a non-empty string")
    if len(value) > max_len:
        raise TooLarge(f"'{key}' is longer than {max_len} characters")
    return storable(value, key)


def required_string(body: Mapping[str, Any], key: str, max_len: int = 65536) -> str:
    value = string(body, key, max_len=max_len)
    assert value is not None
    return value


def id_list(body: dict[str, Any], key: str, max_items: int = MAX_IDS) -> list[int]:
    value = body.get(key)
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 < i <= MAX_ID for i in value
    ):
        raise BadRequest(f"'{key}' must be a list of positive integer ids")
    if len(value) > max_items:
        raise TooLarge(f"'{key}' holds more than {max_items} ids")
    return value


def query_number(query: Any, key: str, default: float, low: float, high: float,
                 integer: bool = True) -> float:
    raw = query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}") from None
    if not low <= value <= high:
        raise BadRequest(f"'{key}' must be from {low:.0f} to {high:.0f}")
    return value


@dataclass(frozen=True)
class Text:
    """A string field of a request (body or query): a missing required one, or one of another
    type, is a 400; a longer one a 413; NUL or a lone surrogate a 400."""

    key: str
    max_len: int = ID_MAX
    required: bool = False

    def get(self, source: Mapping[str, Any]) -> str | None:
        return string(source, self.key, required=self.required, max_len=self.max_len)

    def need(self, source: Mapping[str, Any]) -> str:
        assert self.required
        return required_string(source, self.key, self.max_len)


@dataclass(frozen=True)
class Number:
    """A number in the query string (or an integer in a body), from ``low`` to ``high``."""

    key: str
    default: float
    low: float
    high: float
    integer: bool = True

    def get(self, query: Any) -> float:
        return query_number(query, self.key, self.default, self.low, self.high, self.integer)


@dataclass(frozen=True)
class Flag:
    """A true/false field of a body; absent or null is ``default``."""

    key: str
    default: bool = False

    def get(self, source: Mapping[str, Any]) -> bool:
        value = source.get(self.key)
        if value is None:
            return self.default
        if not isinstance(value, bool):
            raise BadRequest(f"'{self.key}' must be true or false")
        return value


@dataclass(frozen=True)
class Integer:
    """An integer field of a body (not a boolean or a fraction), or None when absent; the
    service checks its range."""

    key: str

    def get(self, source: Mapping[str, Any]) -> int | None:
        value = source.get(self.key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"'{self.key}' must be an integer")
        return value


SENDER = Text("sender", required=True)
RECIPIENT = Text("recipient", required=True)
SENDER_NAME = Text("sender_name")
SENDER_AVATAR = Text("sender_avatar")
TEXT = Text("text", TEXT_MAX)
HTML = Text("html", TEXT_MAX)
MARKDOWN = Text("markdown", TEXT_MAX)
MSGTYPE = Text("msgtype", 16)
MEDIA = Text("media")
EDITS = Text("edits")
REPLACES = Text("replaces")
NEW = Flag("new")
TS = Integer("ts")
NAME = Text("name")
AVATAR = Text("avatar")
EVENT_ID = Text("event_id", required=True)
REASON = Text("reason", 1000)
USER_ID = Text("user_id")
REMOTE_ID = Text("remote_id")
LIMIT = Number("limit", 100, 1, 1000)
AFTER = Number("after", 0, 0, MAX_ID)
WAIT = Number("wait", 0, 0, 3600, integer=False)
TIMEOUT_MS = Number("timeout_ms", 30_000, 1, 600_000)

# operationId in openapi.yaml -> the string fields its handler reads.
BODY_FIELDS: dict[str, tuple[Text, ...]] = {
    "sendMessage": (SENDER, RECIPIENT, TEXT, HTML, MARKDOWN, MSGTYPE, SENDER_NAME, SENDER_AVATAR,
                    MEDIA, EDITS),
    "react": (SENDER, RECIPIENT),
    "setGhostProfile": (NAME, AVATAR),
    "openDM": (SENDER, RECIPIENT, SENDER_NAME, SENDER_AVATAR, REPLACES),
    "setTyping": (SENDER, RECIPIENT),
    "markRead": (SENDER, RECIPIENT, EVENT_ID),
}
QUERY_FIELDS: dict[str, tuple[Text, ...]] = {
    "deleteMessage": (SENDER, REASON),
    "listDMs": (USER_ID, REMOTE_ID),
}
FLAGS: dict[str, tuple[Flag, ...]] = {"openDM": (NEW,)}  # booleans of a body
INTEGERS: dict[str, tuple[Integer, ...]] = {"sendMessage": (TS,)}  # integers of a body
NUMBERS: dict[str, tuple[Number, ...]] = {  # query parameters, and setTyping's body
    "listDMs": (LIMIT,),
    "pullEvents": (AFTER, LIMIT, WAIT),
    "listDeadLetters": (LIMIT,),
    "setTyping": (TIMEOUT_MS,),
}
