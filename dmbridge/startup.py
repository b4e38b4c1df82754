"""Failures that keep the bridge from starting, each told in one line: what, why, what to do."""

from __future__ import annotations

import os
import pwd


class StartupError(Exception):
    """The bridge cannot start; ``str(e)`` names the file or setting, the cause and the fix."""


def current_user() -> str:
    """Who the process runs as, the way an admin would name it in chown: ``nobody (uid 65534)``."""
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
