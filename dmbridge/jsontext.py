"""JSON from outside the bridge: bounded nesting, and text both databases can hold.

Python's json module recurses once per nesting level, so a body nested about a thousand levels
deep raises RecursionError (or worse) in whatever touches it. The depth is measured here on the
raw bytes, before parsing, without recursion. PostgreSQL text refuses NUL, and neither database
(nor UTF-8) can hold a lone surrogate, which JSON's ``\\ud800`` escapes can produce.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

# A JSON string literal (escapes included); what is left outside them is structure and scalars.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# Escapes that decode to text no database can hold; checked before walking a parsed body.
_BAD_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class TooDeep(ValueError):
    """The JSON text nests arrays and objects deeper than allowed."""


class _Cut:
    """Stands for a value cut out because it was nested too deep."""

    def __repr__(self) -> str:
        return "<nested too deep>"


CUT: Any = _Cut()


def nesting_depth(data: bytes) -> int:
    """How deep arrays and objects nest in this JSON text (0 for a scalar)."""
    brackets = _STRING.sub(b"", data).translate(_BRACKETS, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(accumulate(memoryview(brackets).cast("b")))


def _may_nest_deeper(data: bytes, max_depth: int) -> bool:
    """Could the text nest deeper? Cheap: no deeper than it has opening brackets."""
    return data.count(b"[") + data.count(b"{") > max_depth and nesting_depth(data) > max_depth


def loads(data: bytes, max_depth: int) -> Any:
    """Parse UTF-8 JSON text; raises ValueError if it is not JSON, TooDeep if it nests deeper."""
    if _may_nest_deeper(data, max_depth):
        raise TooDeep(f"the JSON nests deeper than {max_depth} levels")
    return json.loads(data.decode("utf-8"))


def loads_cut(data: bytes, max_depth: int) -> tuple[Any, bool]:
    """Parse UTF-8 JSON text, replacing each value nested deeper than ``max_depth`` by ``CUT``.

    For a homeserver's transaction, where one deep event must not cost the others. Returns the
    value and whether anything was cut. Raises ValueError if it is not JSON.
    """
    if not _may_nest_deeper(data, max_depth):
        return json.loads(data.decode("utf-8")), False
    out, depth, cut_from, last = bytearray(), 0, -1, 0
    for match in _TOKEN.finditer(data):
        token = match.group()
        if token[0] == ord('"'):
            continue
        if token in (b"[", b"{"):
            depth += 1
            if depth == max_depth + 1:
                cut_from = match.start()
        else:
            if depth == max_depth + 1 and cut_from >= 0:
                out += data[last:cut_from] + b"NaN"  # no JSON value: only CUT becomes NaN
                last, cut_from = match.end(), -1
            depth -= 1
    out += data[last:]
    return json.loads(out.decode("utf-8"), parse_constant=lambda _: CUT), True


def holds_cut(value: Any) -> bool:
    """Does this parsed value contain a ``CUT`` (anywhere; it is nested boundedly by now)?"""
    if value is CUT:
        return True
    if isinstance(value, dict):
        return any(holds_cut(v) for v in value.values())
    if isinstance(value, list):
        return any(holds_cut(v) for v in value)
    return False


def may_hold_unstorable(data: bytes) -> bool:
    """Could this JSON text decode to NUL or a lone surrogate? (Cheap; false positives fine.)"""
    return _BAD_ESCAPE.search(data) is not None


def reread(value: Any, max_depth: int) -> tuple[Any, bool]:
    """A value made in memory (decrypted, say) as if read from JSON text: whatever is nested
    deeper than ``max_depth`` cut out, and whether it may hold NUL or a lone surrogate or had
    anything cut (then it needs :func:`scrub` and :func:`holds_cut` as received text does)."""
    data = json.dumps(value).encode()  # NUL and lone surrogates are written as \u escapes
    copy, cut = loads_cut(data, max_depth)
    return copy, cut or may_hold_unstorable(data)


def storable_text(value: str) -> str:
    """The text with NUL and lone surrogates replaced by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", value)


def scrub(value: Any) -> Any:
    """A parsed JSON value whose strings (keys too) both databases can hold."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable_text(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value
