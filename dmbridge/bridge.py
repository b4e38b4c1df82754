"""The running bridge: builds every part once, starts them in order, stops them in reverse."""

from __future__ import annotations

import asyncio
import errno
import logging

import aiohttp
from mautrix.appservice.state_store.asyncpg import PgASStateStore
from mautrix.errors import MatrixConnectionError, MatrixRequestError

from .api import PREFIX, make_api_app
from .appservice import BridgeAppService
from .config import Settings
from .db import Stores, create_database, safe_url, start_database
from .dms import DMService
from .ghosts import Ghosts
from .homeserver import Homeserver, RequestLog
from .invites import InviteHandler
from .matrix import MatrixHandler
from .media import MediaLinks, MediaService
from .outbox import Outbox
from .startup import StartupError

log = logging.getLogger("dmbridge")

PRUNE_INTERVAL_S = 3600


class Bridge:
    """Everything the bridge holds; the one place objects are built and handed down."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.requests = RequestLog()
        self.db = create_database(settings.database_url, db_args=self._db_args(settings),
                                  log=logging.getLogger("dmbridge.db"))
        self.state_store = PgASStateStore(self.db)
        self.stores = Stores.over(self.db)
        self.appservice = BridgeAppService(settings, self.state_store)
        self.ghosts = Ghosts(self.appservice, self.stores)
        self.matrix = MatrixHandler(
            stores=self.stores, networks=settings.networks, appservice=self.appservice,
            ghosts=self.ghosts, on_leave=settings.on_leave,
        )
        self.appservice.handler = self.matrix
        self.links = MediaLinks(settings.as_token, settings.media.public_url,
                                settings.media.link_ttl)
        self.outbox = Outbox(stores=self.stores, networks=settings.networks,
                             settings=settings.delivery, present=self.links.attach)
        self.matrix.on_queued = self.outbox.wake
        self._dms: DMService | None = None
        self._homeserver: Homeserver | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._invites: InviteHandler | None = None
        self._listening = False

    @staticmethod
    def _db_args(settings: Settings) -> dict[str, int]:
        if settings.database_url.startswith("sqlite"):
            return {}  # mautrix's one connection: SQLite has a single writer anyway
        return {"min_size": settings.db_min_size, "max_size": settings.db_max_size}

    @property
    def dms(self) -> DMService:
        if self._dms is None:
            raise RuntimeError("the bridge is not started")
        return self._dms

    async def start(self, *, ping: bool = True) -> None:
        log.info("starting: database %s", safe_url(self.settings.database_url))
        await start_database(self.db, self.settings.database_url)
        await self.state_store.upgrade_table.upgrade(self.db)
        await self.matrix.prune()
        self.appservice.new_session(self.requests)
        self._homeserver = Homeserver(
            self.settings.homeserver_url, self.settings.as_token, self.requests
        )
        media = MediaService(settings=self.settings, stores=self.stores,
                             homeserver=self._homeserver, links=self.links)
        self._dms = DMService(
            settings=self.settings, stores=self.stores, appservice=self.appservice,
            ghosts=self.ghosts, homeserver=self._homeserver, media=media,
        )
        self._invites = InviteHandler(
            stores=self.stores, networks=self.settings.networks, ghosts=self.ghosts,
            appservice=self.appservice, dms=self._dms, queued=self.outbox.wake,
        )
        self.matrix.on_invited = self._invites.wake
        self.appservice.app.add_subapp(PREFIX, make_api_app(self._dms, self.outbox, media,
                                                            self.settings))
        await self._listen()
        self._prune_task = asyncio.create_task(self._prune_loop())
        log.info("listening on http://%s:%d (API under %s)", self.settings.hostname,
                 self.settings.port, PREFIX)
        await self._register_bot()
        if ping:
            await self.ping()
        await self.outbox.start()
        self._invites.start()
        self.appservice.ready = True

    async def _listen(self) -> None:
        host, port = self.settings.hostname, self.settings.port
        self._listening = True  # from here on, stop() has a listener (maybe half set up) to stop
        try:
            await self.appservice.start(host, port)
        except OSError as e:
            raise StartupError(
                f"cannot listen on {host}:{port} (appservice.hostname, appservice.port): "
                f"{_LISTEN_CAUSES.get(e.errno or 0, e.strerror or str(e))}; stop what holds it, "
                "or choose another appservice.port (and appservice.address, then run "
                "`dmbridge generate` for the registration)") from e

    async def _register_bot(self) -> None:
        try:
            await self.appservice.intent.ensure_registered()
        except (MatrixRequestError, MatrixConnectionError, aiohttp.ClientError) as e:
            log.error("could not register the bridge bot %s at %s: %s",
                      self.settings.bot_user_id, self.settings.homeserver_url, e)

    async def ping(self) -> bool:
        """Ask the homeserver to call us back; says which URL failed if it cannot."""
        try:
            duration = await self.appservice.ping_self()
        except MatrixRequestError as e:
            log.error(
                "the homeserver could not reach the bridge at %s (appservice.address): %s %s",
                self.settings.appservice_address, e.errcode, e.message,
            )
            return False
        except (MatrixConnectionError, aiohttp.ClientError) as e:  # mautrix wraps the latter
            log.error("the homeserver at %s (homeserver.address) is unreachable: %s",
                      self.settings.homeserver_url, e)
            return False
        log.info("the homeserver reaches the bridge at %s (%d ms)",
                 self.settings.appservice_address, duration)
        return True

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_S)
            try:
                await self.matrix.prune()
                await self.outbox.prune()
            except Exception:
                log.exception("pruning processed events and delivered items failed")

    async def stop(self) -> None:
        log.info("stopping")
        if self._prune_task:
            self._prune_task.cancel()
        if self._invites is not None:
            await self._invites.stop()
        await self.outbox.stop()
        if self._listening:  # not after a start that failed before it listened
            await self.appservice.stop()
        if self._homeserver is not None:
            await self._homeserver.close()
        await self.db.stop()


_LISTEN_CAUSES = {
    errno.EADDRINUSE: "another program already listens there",
    errno.EADDRNOTAVAIL: "no network interface of this machine has that address",
    errno.EACCES: "not allowed (ports below 1024 need privileges)",
}
