"""Reversible escaping of remote IDs into Matrix user-ID localparts.

Follows the mapping the Matrix spec suggests ("Mapping from other character sets"):
``_`` becomes ``__``, an upper-case letter ``X`` becomes ``_x``, and every other byte outside
``a-z 0-9 . - /`` (``=`` included, being the escape character) becomes ``=`` plus two
lower-case hex digits of its UTF-8 encoding.
"""

from __future__ import annotations

import re

_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789.-/")
_VALID_LOCALPART = re.compile(r"[a-z0-9._=\-/]+")


class LocalpartError(ValueError):
    """The string is not a canonical escaped localpart."""


def escape(remote_id: str) -> str:
    out: list[str] = []
    for byte in remote_id.encode("utf-8"):
        char = chr(byte)
        if byte in _PLAIN:
            out.append(char)
        elif char == "_":
            out.append("__")
        elif "A" <= char <= "Z":
            out.append("_" + char.lower())
        else:
            out.append(f"={byte:02x}")
    return "".join(out)


def unescape(localpart: str) -> str:
    """Invert :func:`escape`; refuses anything :func:`escape` would not produce."""
    data = bytearray()
    i = 0
    while i < len(localpart):
        char = localpart[i]
        if char == "_":
            nxt = localpart[i + 1 : i + 2]
            if nxt == "_":
                data += b"_"
            elif "a" <= nxt <= "z":
                data += nxt.upper().encode()
            else:
                raise LocalpartError(f"bad escape '_{nxt}' at {i}")
            i += 2
        elif char == "=":
            hexpart = localpart[i + 1 : i + 3]
            if not re.fullmatch(r"[0-9a-f]{2}", hexpart):
                raise LocalpartError(f"bad escape '={hexpart}' at {i}")
            data.append(int(hexpart, 16))
            i += 3
        elif ord(char) < 128 and ord(char) in _PLAIN:
            data.append(ord(char))
            i += 1
        else:
            raise LocalpartError(f"character {char!r} is not allowed in a localpart")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LocalpartError("escaped bytes are not UTF-8") from e
    if escape(text) != localpart:
        raise LocalpartError("not in canonical form")
    return text


def is_valid_localpart(localpart: str) -> bool:
    return bool(_VALID_LOCALPART.fullmatch(localpart))
