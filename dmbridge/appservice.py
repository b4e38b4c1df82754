"""The appservice endpoints the homeserver calls, on top of mautrix's AppService.

mautrix answers a transaction before its handlers finish and deduplicates by transaction ID in
memory; here a transaction is answered 200 only once its events are committed, and duplicates
are found by event ID in the database (see :mod:`dmbridge.matrix`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

import aiohttp
from aiohttp import web
from aiohttp.client_middlewares import ClientMiddlewareType
from mautrix.appservice import AppService, AppServiceAPI
from mautrix.appservice.state_store import ASStateStore
from mautrix.util.logging import TraceLogger

from . import jsontext
from .config import Settings
from .diagnosis import wrong_hs_token
from .encryption import Encryption
from .listener import Listener
from .lru import LRU
from .matrix import MatrixHandler
from .metrics import Metrics

log = logging.getLogger("dmbridge.appservice")

MAX_TRANSACTION_BYTES = 64 * 1024 * 1024
# Synapse refuses event content nested deeper than about 100 levels; a transaction adds three.
MAX_TRANSACTION_DEPTH = 128
# How deep an event may nest: what the transaction allows less the event's own place in it
# ({"events": [{...}]}); for events the bridge decrypts.
EVENT_MAX_DEPTH = MAX_TRANSACTION_DEPTH - 2
TOKEN_WARNING_EVERY_S = 60.0
# Ghosts whose homeserver client is kept between uses.
GHOST_CLIENTS_MAX = 10_000


def _error(status: int, errcode: str, message: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": message}, status=status)


class ClientLogs(TraceLogger):
    """The logger mautrix's homeserver clients name theirs after, not one to log on.

    mautrix names a logger after each ghost its client acts as (``….api.<user ID>``), and
    :mod:`logging` keeps every logger it ever made: memory that grows with each ghost. Here the
    bot's client logs on ``….api.bot`` and every ghost's on ``….api.ghost``; a request's line
    names its ghost anyway (its ``user_id`` parameter).
    """

    def __init__(self, base: logging.Logger, *, clients: bool = False) -> None:
        super().__init__(base.name)
        self.parent = base  # if anything logs here after all, it reaches base's handlers
        self._base = base
        self._clients = clients  # the "api" level, whose children are named per user

    def getChild(self, suffix: str) -> TraceLogger:
        if self._clients:
            return cast(TraceLogger, self._base.getChild("bot" if suffix == "bot" else "ghost"))
        child = cast(TraceLogger, self._base.getChild(suffix))
        return ClientLogs(child, clients=True) if suffix == "api" else child


def _as_received(received: list[Any], decrypted: list[Any]) -> tuple[list[Any], bool]:
    """The decrypted events held to the same rules as the transaction's text: a value nested
    too deep is cut out, and whether any may hold NUL or a lone surrogate (its plaintext never
    went through the transaction's checks)."""
    out, suspect = [], False
    for before, after in zip(received, decrypted, strict=True):
        if after is not before:
            after, doubtful = jsontext.reread(after, EVENT_MAX_DEPTH)
            suspect = suspect or doubtful
        out.append(after)
    return out, suspect


class BridgeAppService(AppService):
    handler: MatrixHandler
    encryption: Encryption | None = None

    def __init__(self, settings: Settings, state_store: ASStateStore, listener: Listener,
                 metrics: Metrics | None = None) -> None:
        self.listener = listener
        self.metrics = metrics if metrics is not None else Metrics()
        super().__init__(
            server=settings.homeserver_url,
            domain=settings.domain,
            as_token=settings.as_token,
            hs_token=settings.hs_token,
            bot_localpart=settings.bot_localpart,
            id=settings.appservice_id,
            log="dmbridge.appservice",
            state_store=state_store,
            aiohttp_params={"client_max_size": MAX_TRANSACTION_BYTES},
        )
        # The state store is updated by MatrixHandler before the transaction is acknowledged.
        self.event_handlers.clear()
        self._next_token_warning = 0.0

    def new_session(self, middlewares: Sequence[ClientMiddlewareType]) -> aiohttp.ClientSession:
        """The client session mautrix's intents use; ``middlewares`` count every request and
        wait out rate limits."""
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connection_limit),
            headers={"User-Agent": self.default_ua},
            middlewares=middlewares,
        )
        self._http_session = session
        return session

    async def start(self, host: str = "127.0.0.1", port: int = 8080) -> None:
        """As mautrix's start, but on the session from :meth:`new_session`, and listening
        through the :class:`Listener` (connection cap, timeouts)."""
        await self.state_store.open()
        api = AppServiceAPI(
            base_url=self.server,
            bot_mxid=self.bot_mxid,
            log=ClientLogs(self.log),
            token=self.as_token,
            state_store=self.state_store,
            bridge_name=self.bridge_name,
            client_session=self.http_session,
            default_retry_count=self.default_http_retry_count,
        )
        # mautrix keeps a client per ghost for ever; one is cheap to make again (transaction
        # IDs are counted by the parent), so only the recently used are kept.
        api.children = LRU(GHOST_CLIENTS_MAX)
        self._intent = api.bot_intent()
        self.listener.install(self.app)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await self.listener.start(self.runner, host, port)

    def _auth_error(self, request: web.Request) -> web.Response | None:
        """401 without a token, 403 with a wrong one, as the spec asks."""
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
        token = token or request.rel_url.query.get("access_token")
        if not token:
            return _error(401, "M_MISSING_TOKEN", "no hs_token in the request")
        if not hmac.compare_digest(token.encode(), self.hs_token.encode()):
            # Once a minute at most: the homeserver retries, and the bridge pings it.
            now = time.monotonic()
            level = logging.WARNING if now >= self._next_token_warning else logging.DEBUG
            if level == logging.WARNING:
                self._next_token_warning = now + TOKEN_WARNING_EVERY_S
            log.log(level, "%s", wrong_hs_token(f"{request.method} {request.path}"))
            return _error(403, "M_FORBIDDEN", "wrong hs_token")
        return None

    async def _http_handle_transaction(self, request: web.Request) -> web.Response:
        response = await self._handle_transaction(request)
        outcome = {200: "recorded", 500: "failed"}.get(response.status, "invalid")
        self.metrics.transaction(outcome)
        return response

    async def _handle_transaction(self, request: web.Request) -> web.Response:
        if (denied := self._auth_error(request)) is not None:
            return denied
        txn_id = request.match_info["transaction_id"]
        # JSON is UTF-8 whatever Content-Type's charset says; values nested too deep are cut
        # out, so one such event is skipped rather than failing the transaction for ever.
        data = await request.read()
        try:
            body, cut = jsontext.loads_cut(data, MAX_TRANSACTION_DEPTH)
        except ValueError:
            return _error(400, "M_NOT_JSON", "the transaction body is not JSON")
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list):
            return _error(400, "M_BAD_JSON", "the transaction has no 'events' list")
        # Typing and receipts; a homeserver that knows both keys sends the same list twice.
        ephemeral = body.get("ephemeral", body.get("de.sorunome.msc2409.ephemeral"))
        if not isinstance(ephemeral, list):
            ephemeral = []
        untrusted = cut or jsontext.may_hold_unstorable(data)
        try:
            if self.encryption is not None:  # keys for the ghosts' devices; events decrypted
                decrypted = await self.encryption.intake(body, events)
                events, suspect = _as_received(events, decrypted)
                untrusted = untrusted or suspect
            await self.handler.handle_transaction(txn_id, events, ephemeral, untrusted=untrusted)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("transaction %s could not be recorded; the homeserver will resend it",
                          txn_id)
            return _error(500, "M_UNKNOWN", "the transaction could not be recorded, send it again")
        return web.json_response({})

    async def _http_query_user(self, request: web.Request) -> web.Response:
        if (denied := self._auth_error(request)) is not None:
            return denied
        user_id = request.match_info["user_id"]
        try:
            exists = await self.handler.query_user(user_id)
        except Exception:
            log.exception("user query for %s failed", user_id)
            return _error(500, "M_UNKNOWN", "the ghost could not be created")
        if not exists:
            return _error(404, "M_NOT_FOUND", f"{user_id} is not a user of this bridge")
        return web.json_response({})

    async def _http_query_alias(self, request: web.Request) -> web.Response:
        if (denied := self._auth_error(request)) is not None:
            return denied
        return _error(404, "M_NOT_FOUND", "this bridge has no room aliases")

    async def _http_ping(self, request: web.Request) -> web.Response:
        if (denied := self._auth_error(request)) is not None:
            return denied
        try:
            body = jsontext.loads(await request.read(), MAX_TRANSACTION_DEPTH)
        except ValueError:
            body = {}
        txn = body.get("transaction_id") if isinstance(body, dict) else None
        log.debug("ping from the homeserver (%s)", json.dumps(txn))
        return web.json_response({})
