"""The running bridge: builds every part once, starts them in order, stops them in reverse."""

from __future__ import annotations

import asyncio
import errno
import logging

import aiohttp
from aiohttp import web
from mautrix.errors import MatrixConnectionError, MatrixRequestError

from . import requestid
from .api import PREFIX, api_app
from .api.operations import Operations
from .appservice import BridgeAppService
from .config import Settings
from .db import Stores, create_database, safe_url, start_database
from .db.timing import time_queries
from .diagnosis import Problem
from .dms import DMService
from .encryption import CRYPTO_UPGRADE_TABLE, Encryption, tell_undecryptable
from .errors import NotReady, RateLimited
from .ghosts import Ghosts
from .homeserver import Homeserver, RequestLog
from .instances import EncryptingWorker, Instances, SoleWorker
from .invites import InviteHandler, lease_seconds
from .late_keys import LateKeys
from .listener import Listener
from .logfilter import LogLimits
from .matrix import MatrixHandler
from .media import MediaLinks, MediaService
from .metrics import DatabaseGauges, Metrics, StoreCounts, metrics_handler
from .notices import AdminNotices, NoticeRoom
from .outbox import Outbox
from .peers import Peers
from .quotas import Quotas
from .ratelimit import HomeserverLimits, Pacing
from .readiness import Readiness, Watch
from .retention import Retention
from .startup import StartupError
from .statestore import BridgeStateStore
from .undelivered import Undelivered

log = logging.getLogger("dmbridge")


class Bridge:
    """Everything the bridge holds; the one place objects are built and handed down."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log_limits = LogLimits()
        self.requests = RequestLog()
        self.metrics = Metrics()
        limits = settings.rate_limits
        self.limits = HomeserverLimits(self.requests, limits.background_wait, self.metrics)
        self.quotas = Quotas()
        self.pacing = Pacing(limits.rooms_per_second, limits.room_burst, self.quotas,
                             limits.background_wait)
        self.db = create_database(settings.database_url, db_args=self._db_args(settings),
                                  log=logging.getLogger("dmbridge.db"))
        time_queries(self.db, self.metrics.db_query)
        self.instances = Instances(self.db, settings.database_url, settings.creation_timeout)
        self.sole_worker = SoleWorker(settings.database_url)
        self.encrypting_worker = EncryptingWorker(settings.database_url)
        self.state_store = BridgeStateStore(self.db)
        self.stores = Stores.over(self.db)
        self.listener = Listener(settings.listener)
        self.appservice = BridgeAppService(settings, self.state_store, self.listener,
                                           self.metrics)
        self.ghosts = Ghosts(self.appservice, self.stores)
        self.matrix = MatrixHandler(
            stores=self.stores, networks=settings.networks, appservice=self.appservice,
            ghosts=self.ghosts, on_leave=settings.on_leave, metrics=self.metrics,
            encryption=settings.encryption,
        )
        self.appservice.handler = self.matrix
        self.encryption = Encryption(
            mode=settings.encryption, pickle_key=settings.pickle_key,
            homeserver_url=settings.homeserver_url,
            as_token=settings.as_token, db=self.db, stores=self.stores,
            networks=settings.networks, session=lambda: self.appservice.http_session,
        )
        self.late_keys: LateKeys | None = None
        if self.encryption.enabled:
            self.appservice.encryption = self.encryption
            self.late_keys = LateKeys(stores=self.stores, encryption=self.encryption,
                                      matrix=self.matrix)
            self.matrix.on_waiting = self.late_keys.wake
            self.encryption.on_keys = self.late_keys.wake
        self.links = MediaLinks(settings.as_token, settings.media.public_url,
                                settings.media.link_ttl)
        notices = settings.admin_notices
        self._notice_room = NoticeRoom(settings.homeserver_url, settings.as_token,
                                       settings.bot_user_id, notices) if notices.enabled else None
        self.notices = AdminNotices(notices, self._notice_room)
        # Other workers on the same PostgreSQL hear of new outbox items and invites at once.
        self.peers = Peers(settings.database_url, on_outbox=self._heard_outbox,
                           on_invites=self._heard_invites)
        self.undelivered = Undelivered(stores=self.stores, networks=settings.networks,
                                       background_wait=settings.rate_limits.background_wait)
        self.outbox = Outbox(stores=self.stores, networks=settings.networks,
                             settings=settings.delivery, present=self.links.attach,
                             notices=self.notices, metrics=self.metrics,
                             announce=self.peers.outbox_queued, undelivered=self.undelivered)
        self.matrix.on_queued = self.outbox.wake
        self.matrix.handoff = self.outbox  # new replies go straight to delivery
        self.matrix.on_undelivered = self.undelivered.wake
        self.matrix.on_undecryptable = self._undecryptable
        self._notices_sent: set[asyncio.Task[None]] = set()
        self.retention = Retention(self.db, settings.retention)
        self._dms: DMService | None = None
        self._operations: Operations | None = None
        self._homeserver: Homeserver | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._recovery_task: asyncio.Task[None] | None = None
        self._invites: InviteHandler | None = None
        self._listening = False
        self._metrics_runner: web.AppRunner | None = None
        self.readiness = Readiness(self.db, settings.database_url)
        self.readiness.on_change = self._set_ready
        self.watch: Watch | None = None

    def _invited(self) -> None:
        """Invites were recorded here: answered by this worker or another (see invites.py)."""
        if self._invites is not None:
            self._invites.wake()
        self.peers.invites_queued()

    def _undecryptable(self, items: list[tuple[str, str, str]]) -> None:
        """Tell the users in their rooms (in the background) that messages did not go through."""
        if self._homeserver is None:
            return
        task = asyncio.create_task(tell_undecryptable(self._homeserver.send_event, items))
        self._notices_sent.add(task)
        task.add_done_callback(self._notices_sent.discard)

    def _heard_invites(self) -> None:
        if self._invites is not None:
            self._invites.wake()

    def _heard_outbox(self, networks: set[str]) -> None:
        self.outbox.wake_here(networks)

    def _set_ready(self, ready: bool) -> None:
        self.appservice.ready = ready  # mautrix's /_matrix/mau/ready says the same

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

    @property
    def operations(self) -> Operations:
        """The API's operations, for platforms in this process (see :mod:`dmbridge.embedded`);
        NotReady (retry) until the bridge is started."""
        if self._operations is None:
            raise NotReady("the bridge is not started")
        return self._operations

    async def start(self, *, ping: bool = True) -> None:
        """Open the database and listen; then check the homeserver once and return, ready or
        not: the bridge goes on checking in the background (see :mod:`dmbridge.readiness`).

        Raises :class:`StartupError` if something only the config can fix is wrong. With
        ``ping=False`` (benchmarks) the homeserver is not checked at all.
        """
        self.log_limits.install()
        self._log_task = asyncio.create_task(self._log_summaries())
        self.notices.start()
        log.info("starting: database %s", safe_url(self.settings.database_url))
        # Refused before the schema is touched; a folder problem is the database's to explain.
        self.sole_worker.hold(strict=False)
        await start_database(self.db, self.settings.database_url,
                             extra=[self.state_store.upgrade_table, CRYPTO_UPGRADE_TABLE])
        self.sole_worker.hold(strict=True)
        await self.instances.start()
        if self.encryption.enabled:
            await self.encrypting_worker.hold(self.instances.id)
        self.peers.start()
        self.appservice.new_session([self.notices.watch_homeserver, self.limits.middleware])
        self._homeserver = Homeserver(
            self.settings.homeserver_url, self.settings.as_token,
            [self.notices.watch_homeserver, self.limits.middleware],
        )
        if self.encryption.enabled:
            self._homeserver.encrypt = self.encryption.encrypt
        media = MediaService(settings=self.settings, stores=self.stores,
                             homeserver=self._homeserver, links=self.links)
        self._dms = DMService(
            settings=self.settings, stores=self.stores, appservice=self.appservice,
            ghosts=self.ghosts, homeserver=self._homeserver, media=media,
            instances=self.instances, pacing=self.pacing,
            encryption=self.encryption if self.encryption.enabled else None,
        )
        self._invites = InviteHandler(
            stores=self.stores, networks=self.settings.networks, ghosts=self.ghosts,
            appservice=self.appservice, dms=self._dms, queued=self.outbox.wake,
            lease_s=lease_seconds(self.settings.rate_limits.background_wait),
            require_encryption=self.settings.encryption == "require",
            before_join=self.encryption.before_join if self.encryption.enabled else None,
        )
        self.matrix.on_invited = self._invited
        self._operations = Operations(self._dms, self.outbox, media, self.settings, self.quotas,
                                      self.readiness)
        self.appservice.app.add_subapp(PREFIX, api_app(self._operations))
        self._observe(self.appservice.app)
        await self._listen()
        await self._serve_metrics()
        self.retention.start()
        log.info("listening on http://%s:%d (API under %s)", self.settings.hostname,
                 self.settings.port, PREFIX)
        await self.outbox.start()
        self.undelivered.start(self._homeserver)
        if self.late_keys is not None:
            self.late_keys.start()
        self.watch = Watch(self.settings, self.readiness, self._on_contact, self.notices)
        if ping:
            await self.watch.first()
        else:
            if (problem := await self._on_contact()) is not None:
                log.error("%s", problem)
            self.readiness.set([])

    async def _on_contact(self) -> Problem | None:
        """The homeserver accepts the bridge: what needs it at start runs now."""
        assert self._invites is not None and self._dms is not None
        if (problem := await self._register_bot()) is not None:
            return problem
        self._invites.start()
        self._recovery_task = asyncio.create_task(self._recover_unfinished(self._dms))
        return None

    async def failed(self) -> StartupError:
        """Waits until a check finds what only the config can fix (it may never happen)."""
        if self.watch is None:
            await asyncio.Event().wait()
        assert self.watch is not None
        return await asyncio.shield(self.watch.fatal)

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

    def _observe(self, app: web.Application) -> None:
        """Request IDs and metrics on every request to the listener; /metrics, unless it has a
        listener of its own (or is off)."""
        requestid.install(app)
        app.middlewares.insert(1, self.metrics.middleware())
        if self.settings.metrics.enabled and self.settings.metrics.listen is None:
            app.router.add_get("/metrics", self._metrics_handler(), allow_head=False)

    def _metrics_handler(self) -> requestid.Handler:
        networks = [network.id for network in self.settings.networks]
        return metrics_handler(self.metrics,
                               DatabaseGauges(self.metrics, StoreCounts(self.stores), networks))

    async def _serve_metrics(self) -> None:
        """``metrics.listen``: /metrics alone on a listener of its own."""
        listen = self.settings.metrics.listen
        if not self.settings.metrics.enabled or listen is None:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler(), allow_head=False)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        host, port = listen
        try:
            await web.TCPSite(self._metrics_runner, host, port).start()
        except OSError as e:
            raise StartupError(
                f"cannot listen on {host}:{port} (metrics.listen): "
                f"{_LISTEN_CAUSES.get(e.errno or 0, e.strerror or str(e))}; stop what holds it, "
                "or choose another metrics.listen") from e
        log.info("metrics at http://%s/metrics", _host_port(host, port))

    @property
    def metrics_port(self) -> int | None:
        """The port of the metrics' own listener (None without one)."""
        if self._metrics_runner is None or not self._metrics_runner.addresses:
            return None
        return int(self._metrics_runner.addresses[0][1])

    async def _register_bot(self) -> Problem | None:
        try:
            await self.appservice.intent.ensure_registered()
        except (MatrixRequestError, MatrixConnectionError, aiohttp.ClientError,
                RateLimited) as e:
            return Problem("registration", f"could not register the bridge bot "
                           f"{self.settings.bot_user_id} at {self.settings.homeserver_url}: {e}",
                           "see the homeserver's log")
        return None

    @staticmethod
    async def _recover_unfinished(dms: DMService) -> None:
        """DM creations a process that died left unfinished: adopt their rooms, or free them;
        DMs whose replacement by a fresh room was left unfinished: finished or restored.

        In the background; a request for such a pair meanwhile settles it itself.
        """
        try:
            settled = await dms.recover_unfinished()
        except Exception:
            log.exception("recovering unfinished DM creations failed; each is settled when its"
                          " pair is next written to")
        else:
            if settled:
                log.info("settled %d unfinished DM creation(s)", settled)
        try:
            left = await dms.finish_replacements()
        except Exception:
            log.exception("finishing replaced DMs failed; tried again at next start")
            return
        if left:
            log.info("finished %d replaced DM room(s)", left)

    async def _log_summaries(self) -> None:
        while True:
            await asyncio.sleep(self.log_limits.interval)
            self.log_limits.flush()

    async def stop(self) -> None:
        log.info("stopping")
        if self._operations is not None:  # in-process calls end before what they use stops
            await self._operations.in_flight.close()
        if self.watch is not None:
            await self.watch.stop()
        await self.retention.stop()
        for task in (self._log_task, self._recovery_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._invites is not None:
            await self._invites.stop()
        if self.late_keys is not None:
            await self.late_keys.stop()
        await self.outbox.stop()
        await self.undelivered.stop()
        if self._listening:  # not after a start that failed before it listened
            await self.appservice.stop()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        # After everything that may report (dead letters, a failed start), before the end.
        await self.notices.stop()
        if self._notice_room is not None:
            await self._notice_room.close()
        if self._homeserver is not None:
            await self._homeserver.close()
        self.limits.close()
        await self.peers.stop()
        await self.instances.stop()
        await self.encrypting_worker.release()
        await self.stores.messages.drain()  # mappings of sends answered meanwhile
        await self.db.stop()
        self.sole_worker.release()
        self.log_limits.remove()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_LISTEN_CAUSES = {
    errno.EADDRINUSE: "another program already listens there",
    errno.EADDRNOTAVAIL: "no network interface of this machine has that address",
    errno.EACCES: "not allowed (ports below 1024 need privileges)",
}
