"""Secret files rewritten whole: mode and owner kept, nothing half-written, no temp files left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dmbridge.files import replace_file, restrict


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "secret.yaml"
    old_umask = os.umask(0)
    try:
        replace_file(path, "token: x\n")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "token: x\n"
    assert mode(path) == 0o600


def test_a_rewrite_keeps_the_mode_unless_told(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("old\n")
    path.chmod(0o640)
    replace_file(path, "new\n")
    assert (path.read_text(), mode(path)) == ("new\n", 0o640)
    replace_file(path, "newer\n", mode=0o600)
    assert (path.read_text(), mode(path)) == ("newer\n", 0o600)


def test_through_a_symlink_the_target_is_rewritten(tmp_path: Path) -> None:
    target = tmp_path / "real.yaml"
    target.write_text("old\n")
    link = tmp_path / "config.yaml"
    link.symlink_to(target)
    replace_file(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        replace_file(path, "lone surrogate \udc80\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_restrict_takes_group_and_other_permissions_off(tmp_path: Path) -> None:
    path = tmp_path / "dmbridge.db"
    path.touch()
    path.chmod(0o664)
    assert restrict(path) is True
    assert mode(path) == 0o600
    assert restrict(path) is False
    assert restrict(tmp_path / "missing") is False
