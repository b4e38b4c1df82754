"""Is the bridge ready? Its database and homeserver checked at start, then again and again.

At start the bridge listens first, then asks the homeserver (see :mod:`dmbridge.diagnosis`).
While the homeserver does not answer, or answers that it was not set up for the bridge, the
bridge keeps running, not ready, and asks again with a capped exponential backoff; once ready,
it checks every :data:`RECHECK_S` seconds, so a homeserver that goes away (or a database that
does) makes it not ready until they are back. A problem is logged when it appears and then once
per :data:`REPEAT_LOG_S` while it lasts, not at every attempt. A fatal problem (one only the
bridge's config can fix) ends the bridge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
from mautrix.util.async_db import Database

from .config import Settings
from .db import safe_url
from .diagnosis import HomeserverChecks, Problem, Unreachable
from .notices import AdminNotices
from .startup import StartupError

log = logging.getLogger("dmbridge.readiness")

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 10.0
RECHECK_S = 15.0
REPEAT_LOG_S = 60.0
DB_CHECK_TIMEOUT_S = 5.0

NOT_CHECKED = Problem("homeserver", "the homeserver has not been checked yet",
                      "wait for the bridge's first check")


class Readiness:
    """What fails now; the bridge is ready when nothing does."""

    def __init__(self, db: Database, database_url: str) -> None:
        self.db = db
        self.database_url = database_url
        self._failing: list[Problem] = [NOT_CHECKED]
        self.on_change: Callable[[bool], None] = lambda ready: None

    @property
    def ready(self) -> bool:
        return not self._failing

    @property
    def failing(self) -> list[Problem]:
        return list(self._failing)

    def set(self, failing: list[Problem]) -> None:
        was = self.ready
        self._failing = list(failing)
        if self.ready != was:
            self.on_change(self.ready)

    async def database(self) -> Problem | None:
        """A ``SELECT 1`` on the database, answered in time."""
        try:
            await asyncio.wait_for(self.db.fetchval("SELECT 1"), DB_CHECK_TIMEOUT_S)
        except Exception as e:  # whatever the driver raises, the database is not usable
            reason = f"no answer within {DB_CHECK_TIMEOUT_S:g} s" \
                if isinstance(e, TimeoutError) else (str(e) or type(e).__name__)
            return Problem("database", f"database {safe_url(self.database_url)} does not "
                           f"answer: {reason}", "check that the database runs and that the "
                           "bridge may use it (database.url)")
        return None

    async def now(self) -> list[Problem]:
        """What fails, with the database asked right now (the homeserver as last checked)."""
        db = await self.database()
        return [p for p in self._failing if p.check != "database"] + ([db] if db else [])


class Watch:
    """Checks the homeserver (and the database) until the bridge stops.

    ``on_contact`` runs once, the first time the homeserver accepts the bridge's as_token:
    what needs the homeserver at start (the bot's registration, recovery) waits for it.
    """

    def __init__(self, settings: Settings, readiness: Readiness,
                 on_contact: Callable[[], Awaitable[Problem | None]],
                 notices: AdminNotices | None = None) -> None:
        self.settings = settings
        self.readiness = readiness
        self._on_contact = on_contact
        self._notices = notices
        self._contacted = False
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._logged: dict[str, float] = {}
        self._delay = FIRST_DELAY_S
        self.fatal: asyncio.Future[StartupError] = asyncio.get_running_loop().create_future()
        self.last_ping_ms: int | None = None

    async def first(self) -> None:
        """The first round of checks; raises :class:`StartupError` on a fatal problem, and
        goes on checking in the background."""
        self._session = aiohttp.ClientSession()
        delay = await self._round()
        if self.fatal.done():
            raise self.fatal.result()
        self._task = asyncio.create_task(self._run(delay))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _run(self, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            try:
                delay = await self._round()
            except Exception:
                log.exception("checking the homeserver failed")
                delay = MAX_DELAY_S
            if self.fatal.done():
                return

    async def check(self) -> list[Problem]:
        """One round: the database, then the homeserver step by step, stopping at the first
        step that fails (the later ones would only fail the same way)."""
        assert self._session is not None
        failing = []
        if (db := await self.readiness.database()) is not None:
            failing.append(db)
        checks = HomeserverChecks(self.settings, self._session)
        versions = await checks.versions()
        if isinstance(versions, Problem):
            return [*failing, versions]
        if (who := await checks.whoami()) is not None:
            return [*failing, who]
        if not self._contacted:
            if (contact := await self._on_contact()) is not None:
                return [*failing, contact]
            self._contacted = True
        for network in self.settings.networks:
            if (problem := await checks.namespace(network)) is not None:
                failing.append(problem)
        ping = await checks.ping()
        if isinstance(ping, Problem):
            failing.append(ping)
        else:
            self.last_ping_ms = ping
        return failing

    async def _round(self) -> float:
        """Check, record, log; the delay until the next round."""
        was_ready = self.readiness.ready
        failing = await self.check()
        self.readiness.set(failing)
        fatal = next((p for p in failing if p.fatal), None)
        if fatal is not None:
            self.fatal.set_result(StartupError(str(fatal)))
            if self._notices is not None:
                self._notices.startup_problem(f"could not start: {fatal}")
            return 0.0
        if self._notices is not None:
            if any(isinstance(p, Unreachable) for p in failing):
                reason = next(p.reason for p in failing if isinstance(p, Unreachable))
                self._notices.homeserver_unreachable(reason)
            else:
                self._notices.homeserver_recovered()
        if not failing:
            self._delay = FIRST_DELAY_S
            self._logged.clear()
            if not was_ready:
                if self.last_ping_ms is None:
                    log.info("the homeserver does not offer the appservice ping (Matrix v1.7); "
                             "whether it reaches the bridge at %s is not checked",
                             self.settings.appservice_address)
                else:
                    log.info("the homeserver reaches the bridge at %s (%d ms)",
                             self.settings.appservice_address, self.last_ping_ms)
                log.info("ready")
            return RECHECK_S
        delay = self._delay
        self._delay = min(self._delay * 2, MAX_DELAY_S)
        log.debug("not ready (next check in %g s): %s", delay,
                  " | ".join(str(p) for p in failing))
        self._log(failing, delay)
        return delay

    def _log(self, failing: list[Problem], delay: float) -> None:
        now = time.monotonic()
        current = {f"{p.check}: {p.cause}" for p in failing}
        self._logged = {k: t for k, t in self._logged.items() if k in current}
        for problem in failing:
            key = f"{problem.check}: {problem.cause}"
            if now - self._logged.get(key, -REPEAT_LOG_S) < REPEAT_LOG_S:
                continue
            self._logged[key] = now
            if isinstance(problem, Unreachable):
                log.warning("waiting for the homeserver at %s (homeserver.address): %s; "
                            "retrying, next in %g s", self.settings.homeserver_url,
                            problem.reason, delay)
            else:
                log.error("not ready: %s (checking again in %g s)", problem, delay)
                if self._notices is not None:
                    self._notices.startup_problem(f"not ready: {problem}")
