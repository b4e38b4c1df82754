"""Schema migrations, one per file, applied in order by mautrix's UpgradeTable."""

from mautrix.util.async_db import UpgradeTable

upgrade_table = UpgradeTable(database_name="dmbridge")

# Each module registers itself on import, in version order.
from . import (  # noqa: E402,F401
    v01_initial,
    v02_outbox_lifecycle,
    v03_sent_message_event,
    v04_message_map_media,
    v05_creation_owner,
    v06_retention_indexes,
    v07_dm_indexes,
    v08_invite_lease,
    v09_ended_dm_reason,
    v10_undelivered_notice,
    v11_encrypted_rooms,
    v12_outbox_lease_token,
    v13_outbox_queue_under_lane_lock,
)
