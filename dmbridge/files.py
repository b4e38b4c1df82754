"""Files that hold secrets, rewritten whole: a temp file beside them, fsync, rename.

A rewrite keeps the file's owner, group and mode (the service user must still read it after an
admin's command rewrote it as root); a new file is readable by its owner only.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

PRIVATE = 0o600


def replace_file(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` atomically; ``mode`` forces a mode instead of keeping it.

    Raises ``OSError`` (``PermissionError`` when the owner cannot be kept) and leaves the file
    as it was.
    """
    target = Path(os.path.realpath(path))  # through a symlink, not over it
    try:
        old: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(stream.fileno(), old.st_uid, old.st_gid)
            # After the chown, which may clear bits.
            os.fchmod(stream.fileno(), mode if mode is not None
                      else stat.S_IMODE(old.st_mode) if old is not None else PRIVATE)
            os.fsync(stream.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restrict(path: Path) -> bool:
    """Take group and other permissions off a file this process owns; True if it changed."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid() or not mode & 0o077:
        return False
    os.chmod(path, mode & ~0o077)
    return True
