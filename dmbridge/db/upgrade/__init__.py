"""Schema migrations, one per file, applied in order by mautrix's UpgradeTable."""

from mautrix.util.async_db import UpgradeTable

upgrade_table = UpgradeTable(database_name="dmbridge")

from . import v01_initial  # noqa: E402,F401  (registers itself on import)
