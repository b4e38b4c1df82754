"""The lock files pin every dependency pyproject.toml declares, at a version it allows."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
TEST = [Requirement(r) for r in PROJECT["optional-dependencies"]["test"]]


def pins(name: str) -> dict[str, str]:
    """name -> version of each `name==version` line, names normalised as pip compares them."""
    text = (ROOT / name).read_text()
    return {canonicalize_name(n): v
            for n, v in re.findall(r"^([A-Za-z0-9._-]+)==(\S+) \\$", text, re.MULTILINE)}


@pytest.mark.parametrize(("lock", "wanted"), [
    ("requirements.lock", RUNTIME),
    ("requirements-test.lock", RUNTIME + TEST),
])
def test_every_dependency_is_pinned_at_an_allowed_version(
    lock: str, wanted: list[Requirement]
) -> None:
    pinned = pins(lock)
    missing = [str(r) for r in wanted if canonicalize_name(r.name) not in pinned]
    assert not missing, f"{lock} lacks {missing}: run scripts/lock"
    outside = [f"{r} (locked {pinned[canonicalize_name(r.name)]})" for r in wanted
               if pinned[canonicalize_name(r.name)] not in r.specifier]
    assert not outside, f"{lock} pins versions pyproject.toml excludes: {outside}"


def test_every_pin_has_hashes() -> None:
    for lock in ("requirements.lock", "requirements-test.lock"):
        entries = re.split(r"\n(?=\S)", (ROOT / lock).read_text())
        unhashed = [e.split()[0] for e in entries
                    if "==" in e.split("\n")[0] and "--hash=sha256:" not in e]
        assert not unhashed, f"{lock}: {unhashed}"


def test_the_tests_run_on_the_runtime_versions() -> None:
    runtime, test = pins("requirements.lock"), pins("requirements-test.lock")
    assert {n: (v, test.get(n)) for n, v in runtime.items() if test.get(n) != v} == {}
