"""MSC2346 bridge state: what tells clients that a room is bridged, to which network and contact.

Every DM room carries it, the rooms the bridge creates (in their initial state) and the rooms it
adopts from a user's invite (sent once the ghost has joined, when it has the power to).
"""

from __future__ import annotations

from typing import Any

from .networks import Network

EVENT_TYPES = ("m.bridge", "uk.half-shot.bridge")  # the stable name and the one clients read


def state_key(network: Network, remote_id: str) -> str:
    return f"dmbridge://{network.id}/{remote_id}"


def content(network: Network, remote_id: str, ghost_id: str, bot_user_id: str
            ) -> dict[str, Any]:
    return {
        "bridgebot": bot_user_id,
        "creator": ghost_id,
        "protocol": {"id": network.id, "displayname": network.name},
        "channel": {"id": remote_id},
    }


def initial_state(network: Network, remote_id: str, ghost_id: str, bot_user_id: str
                  ) -> list[dict[str, Any]]:
    """The state events, as ``createRoom``'s ``initial_state`` takes them."""
    info = content(network, remote_id, ghost_id, bot_user_id)
    key = state_key(network, remote_id)
    return [{"type": kind, "state_key": key, "content": info} for kind in EVENT_TYPES]
