"""The start-up self-check logs how long the homeserver took to reach the bridge."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from dmbridge.bridge import Bridge
from dmbridge.localhs import free_port
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.settings import make_settings

LINE = re.compile(r"the homeserver reaches the bridge at http://127\.0\.0\.1:\d+ \((\d+) ms\)")


def _bridge_on(hs: FakeHomeserver, tmp_path: Path) -> Bridge:
    return Bridge(make_settings(tmp_path, homeserver_url=hs.url, domain="localhost",
                                port=free_port(), db_url=f"sqlite:///{tmp_path / 'db.sqlite'}"))


@pytest.mark.parametrize(("answer", "logged"), [(0, "0"), (37, "37"), (None, None)])
async def test_the_ping_line_names_its_duration(
    hs: FakeHomeserver, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    answer: int | None, logged: str | None,
) -> None:
    """A homeserver on the same machine answers 0 ms; one that says nothing gets our own
    measure of the round trip."""
    hs.ping_duration_ms = answer
    bridge = _bridge_on(hs, tmp_path)
    caplog.set_level(logging.INFO, logger="dmbridge")
    try:
        await bridge.start()
    finally:
        await bridge.stop()
    [match] = [m for r in caplog.records if (m := LINE.fullmatch(r.getMessage()))]
    if logged is not None:
        assert match.group(1) == logged


async def test_a_homeserver_without_the_ping_does_not_keep_the_bridge_unready(
    hs: FakeHomeserver, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    hs.ping_offered = False
    bridge = _bridge_on(hs, tmp_path)
    caplog.set_level(logging.INFO, logger="dmbridge")
    try:
        await bridge.start()
        assert bridge.readiness.ready
    finally:
        await bridge.stop()
    assert any("does not offer the appservice ping" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
