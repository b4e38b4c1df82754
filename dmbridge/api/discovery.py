"""What a platform can learn about its network from the bridge: how its users' IDs look, how
their ghosts are named, how it receives events, and the limits requests must keep, so a client
checks IDs locally and tells networks apart by the format of an ID."""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..config import Settings
from ..dms import MAX_CONTENT_BYTES
from ..networks import Network
from ..relations import MAX_REACTION_KEY
from ..timestamps import EARLIEST_MS, MAX_AHEAD_MS
from .body import ID_MAX, TEXT_MAX

API_VERSION = "v1"


def describe(network: Network, settings: Settings) -> dict[str, Any]:
    ghost = f"@{network.localpart_prefix}{{remote_id}}{network.localpart_suffix}:{network.domain}"
    quotas = network.quotas
    return {
        "network": network.id,
        "name": network.name,
        "api_version": API_VERSION,
        "bridge_version": __version__,
        "remote_id_pattern": network.remote_id_pattern.pattern,
        "ghost_user_id_template": ghost,
        "ghost_displayname_template": network.displayname,
        "delivery": {"mode": network.delivery.mode},
        "limits": {
            "max_body_bytes": settings.max_body_bytes,
            "max_id_chars": ID_MAX,
            "max_text_chars": TEXT_MAX,
            "max_event_bytes": MAX_CONTENT_BYTES,
            "max_upload_bytes": settings.media.max_upload_bytes,
            "max_reaction_key_chars": MAX_REACTION_KEY,
            "pull_max_wait_s": settings.delivery.pull_max_wait,
            "ts_max_ahead_ms": MAX_AHEAD_MS,
            "ts_earliest_ms": EARLIEST_MS,
        },
        "quotas": {
            "messages_per_second": quotas.messages_per_second,
            "message_burst": quotas.message_burst,
            "new_dms_per_hour": quotas.new_dms_per_hour,
        },
    }
