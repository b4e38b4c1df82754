"""The creation marker: a state event every DM room the bridge creates carries from its start.

It names the pair and the claim that made the room, so a room made just before a crash is found
again (by asking the homeserver) or recognised (in the homeserver's transactions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mautrix.types import UserID

MARKER = "net.dmbridge.dm"
# One per room. Not the user's ID: homeservers refuse a state key starting with "@" from anyone
# but that user ("You are not allowed to set others state").
MARKER_STATE_KEY = ""


@dataclass(frozen=True)
class Marker:
    ghost_id: UserID
    user_id: UserID
    network: str
    remote_id: str
    claim: str

    def state_event(self) -> dict[str, Any]:
        """As an entry of createRoom's initial_state."""
        return {"type": MARKER, "state_key": MARKER_STATE_KEY, "content": {
            "ghost_id": self.ghost_id, "user_id": self.user_id, "network": self.network,
            "remote_id": self.remote_id, "claim": self.claim,
        }}

    @classmethod
    def read(cls, content: object, sender: object, state_key: object) -> Marker | None:
        """The marker in a state event, if it is one the ghost itself set."""
        if not isinstance(content, dict) or state_key != MARKER_STATE_KEY:
            return None
        fields = [content.get(k) for k in ("ghost_id", "user_id", "network", "remote_id",
                                             "claim")]
        if not all(isinstance(f, str) and f for f in fields):
            return None
        ghost_id, user_id, network, remote_id, claim = (str(f) for f in fields)
        if ghost_id != sender:
            return None
        return cls(UserID(ghost_id), UserID(user_id), network, remote_id, claim)
