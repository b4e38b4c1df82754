"""Ghost user IDs as a platform makes them from the network's description."""

from __future__ import annotations


def escaped_as_documented(remote_id: str) -> str:
    """A remote ID escaped as the README's "Ghost IDs" says, for a client to fill in
    ``ghost_user_id_template``."""
    out = []
    for char in remote_id:
        if char in "abcdefghijklmnopqrstuvwxyz0123456789.-/":
            out.append(char)
        elif char == "_":
            out.append("__")
        elif "A" <= char <= "Z":
            out.append("_" + char.lower())
        else:
            out.extend(f"={byte:02x}" for byte in char.encode())
    return "".join(out)
