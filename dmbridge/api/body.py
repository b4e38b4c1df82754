"""Reading and checking request bodies: size-limited, JSON objects, typed fields."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from .. import jsontext
from ..errors import BadRequest, NotJSON, TooLarge, storable

# Request bodies of this API nest three levels at most; anything far deeper is an attack.
MAX_JSON_DEPTH = 32


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


def id_list(body: dict[str, Any], key: str, max_items: int = 1000) -> list[int]:
    value = body.get(key)
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**62 for i in value
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
