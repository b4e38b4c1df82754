"""The other workers on the same PostgreSQL database: told of new work at once, and heard from.

A worker commits a new outbox item or invite; the worker that should act on it may be another
(a platform long-polls another worker, or another has a free delivery slot). Each worker keeps
one more connection that LISTENs on two channels and NOTIFYs them after its own commits, so the
others are woken at once. While that connection is down, workers find new work the way they
always also do: outbox items within a second, invites within ten. SQLite has one worker, so no
peers.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

import asyncpg

from . import wake

log = logging.getLogger("dmbridge.peers")

OUTBOX = "dmbridge_outbox"  # payload: the networks with new items, comma-separated
INVITES = "dmbridge_invites"
CONNECT_TIMEOUT_S = 5.0
RECONNECT_S = (1.0, 30.0)  # first and longest wait before connecting again
KEEPALIVE_S = 30.0  # an idle connection is checked this often (a silent drop shows only in use)


class Peers:
    def __init__(self, database_url: str, *, on_outbox: Callable[[set[str]], None],
                 on_invites: Callable[[], None]) -> None:
        self.database_url = database_url
        self.enabled = not database_url.startswith("sqlite")
        self._on_outbox = on_outbox
        self._on_invites = on_invites
        self.heard: Counter[str] = Counter()  # wake-ups from other workers, by channel
        self.listening = asyncio.Event()  # set while the others' announcements are heard
        self._networks: set[str] = set()  # to announce
        self._invites = False
        self._outgoing = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    # --- telling the others -----------------------------------------------------------------

    def outbox_queued(self, networks: set[str]) -> None:
        """Items for these networks were committed here."""
        if self.enabled and networks:
            self._networks |= networks
            self._outgoing.set()

    def invites_queued(self) -> None:
        if self.enabled:
            self._invites = True
            self._outgoing.set()

    # --- running ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def _run(self) -> None:
        delay, lost_before = RECONNECT_S[0], False
        while True:
            try:
                self._conn = await self._connect()
            except Exception as e:  # whatever the cause, the workers poll meanwhile
                if not lost_before:
                    log.warning("cannot listen for other workers' new work (%r); looking for"
                                " it in the database meanwhile; trying again", e)
                    lost_before = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_S[1])
                continue
            if lost_before:
                log.info("listening for other workers' new work again")
            delay, lost_before = RECONNECT_S[0], False
            self.listening.set()
            try:
                await self._serve(self._conn)
            except Exception as e:  # a dropped connection surfaces as many kinds of error
                log.warning("lost the connection that hears other workers (%r); looking for"
                            " their new work in the database until it is back", e)
                lost_before = True
            finally:
                self.listening.clear()
                self._conn.terminate()
                self._conn = None

    async def _connect(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            self.database_url, timeout=CONNECT_TIMEOUT_S,
            server_settings={"application_name": "dmbridge-peers"})
        try:
            conn.add_termination_listener(lambda _: self._outgoing.set())
            await conn.add_listener(OUTBOX, self._heard)
            await conn.add_listener(INVITES, self._heard)
        except BaseException:
            conn.terminate()  # not left open behind a failed (or cancelled) set-up
            raise
        log.debug("listening on %s and %s", OUTBOX, INVITES)
        return conn

    async def _serve(self, conn: asyncpg.Connection) -> None:
        """Send what this worker queued, until the connection is lost."""
        while True:
            woken = await wake.wait(self._outgoing, KEEPALIVE_S)
            self._outgoing.clear()
            if conn.is_closed():
                raise ConnectionError("the connection was closed")
            if not woken:
                await conn.execute("SELECT 1", timeout=CONNECT_TIMEOUT_S)
                continue
            networks, self._networks = self._networks, set()
            invites, self._invites = self._invites, False
            # NOTIFY's payload is a literal; pg_notify takes parameters.
            if networks:
                await conn.execute("SELECT pg_notify($1, $2)", OUTBOX,
                                   ",".join(sorted(networks)), timeout=CONNECT_TIMEOUT_S)
            if invites:
                await conn.execute("SELECT pg_notify($1, '')", INVITES,
                                   timeout=CONNECT_TIMEOUT_S)

    def _heard(self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, pid: int,
               channel: str, payload: object) -> None:
        if pid == conn.get_server_pid():
            return  # this worker's own announcement
        self.heard[channel] += 1
        log.debug("woken by another worker (backend %d): %s %s", pid, channel, payload)
        if channel == OUTBOX:
            self._on_outbox({n for n in str(payload).split(",") if n})
        elif channel == INVITES:
            self._on_invites()
