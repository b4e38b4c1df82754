"""The readiness rules: backoff while not ready, one log line per cause per minute, a fatal
problem ends the wait, the database asked at each readiness request.

The homeserver's answers are scripted here; tests/integration/test_readiness.py checks them
against a real Synapse.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from mautrix.util.async_db import Database

from dmbridge.diagnosis import Problem, Unreachable
from dmbridge.readiness import FIRST_DELAY_S, MAX_DELAY_S, RECHECK_S, Readiness, Watch
from dmbridge.startup import StartupError
from tests.support.settings import make_settings

DOWN = Unreachable("homeserver", "the homeserver at ... is unreachable: cannot connect",
                   "start it", reason="cannot connect")
NOT_LOADED = Problem("registration", "the homeserver does not know the bridge's as_token",
                     "restart the homeserver with the registration")
WRONG_DOMAIN = Problem("registration", "the homeserver names the bot on another domain",
                       "set homeserver.domain", fatal=True)


class FakeDatabase:
    def __init__(self) -> None:
        self.error: Exception | None = None

    async def fetchval(self, query: str) -> Any:
        if self.error is not None:
            raise self.error
        return 1


class ScriptedWatch(Watch):
    """Each round's checks answer the next item of ``script``."""

    def __init__(self, script: list[list[Problem]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script: Iterator[list[Problem]] = iter(script)

    async def check(self) -> list[Problem]:
        return next(self.script)


@pytest.fixture
def readiness() -> Readiness:
    return Readiness(cast(Database, FakeDatabase()), "sqlite:///x.db")


async def _on_contact() -> Problem | None:
    return None


def watch(tmp_path: Path, readiness: Readiness, script: list[list[Problem]]) -> ScriptedWatch:
    settings = make_settings(tmp_path, homeserver_url="http://127.0.0.1:1", domain="localhost",
                             port=1, db_url="sqlite:///x.db")
    return ScriptedWatch(script, settings=settings, readiness=readiness, on_contact=_on_contact)


async def test_the_wait_backs_off_to_a_cap_and_is_logged_once(
    tmp_path: Path, readiness: Readiness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dmbridge.readiness")
    w = watch(tmp_path, readiness, [[DOWN]] * 7 + [[]])
    delays = [await w._round() for _ in range(7)]
    assert delays == [FIRST_DELAY_S, 2, 4, 8, MAX_DELAY_S, MAX_DELAY_S, MAX_DELAY_S]
    assert not readiness.ready and readiness.failing == [DOWN]
    waits = [r for r in caplog.records if "waiting for the homeserver" in r.getMessage()]
    assert len(waits) == 1 and waits[0].levelno == logging.WARNING
    assert waits[0].getMessage().endswith("(homeserver.address): cannot connect; retrying, "
                                          "next in 1 s")

    assert await w._round() == RECHECK_S
    assert readiness.ready
    assert [r.getMessage() for r in caplog.records][-1] == "ready"


async def test_a_new_cause_is_logged_at_once_and_a_fixed_one_forgotten(
    tmp_path: Path, readiness: Readiness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dmbridge.readiness")
    w = watch(tmp_path, readiness, [[DOWN], [NOT_LOADED], [NOT_LOADED], [DOWN]])
    for _ in range(4):
        await w._round()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "waiting for the homeserver" in messages[0]
    assert messages[1].startswith("not ready: the homeserver does not know the bridge's "
                                  "as_token; restart the homeserver with the registration")
    assert "waiting for the homeserver" in messages[2]  # it went away and came back


async def test_a_fatal_problem_ends_the_first_check(tmp_path: Path, readiness: Readiness
                                                    ) -> None:
    w = watch(tmp_path, readiness, [[WRONG_DOMAIN]])
    with pytest.raises(StartupError) as raised:
        await w.first()
    await w.stop()
    assert str(raised.value) == "the homeserver names the bot on another domain; set " \
        "homeserver.domain"
    assert not readiness.ready


async def test_the_database_is_asked_at_each_readiness_request(readiness: Readiness) -> None:
    readiness.set([])
    assert await readiness.now() == []
    db = cast(FakeDatabase, readiness.db)
    db.error = ConnectionRefusedError("connection refused")
    [failing] = await readiness.now()
    assert failing.check == "database"
    assert failing.cause == "database sqlite:///x.db does not answer: connection refused"
    db.error = None
    assert await readiness.now() == []
