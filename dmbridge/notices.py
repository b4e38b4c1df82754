"""Notices to a homeserver admin about what needs a human: dead letters, a platform's webhook or
the homeserver out of reach for a while, problems at start-up.

Whoever notices something calls :meth:`AdminNotices.report` (or one of the helpers built on it):
it never blocks and never fails. Notices wait in a bounded queue and are sent by one background
task as ``m.notice`` messages from the bridge bot, into a DM with the admin (opened once, found
again through the bot's ``m.direct``) or into a configured room. A kind reported again within
``repeat_window`` is held back, counted, and summarised when the window ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp.client_middlewares import ClientHandlerType

log = logging.getLogger("dmbridge.notices")

QUEUE_SIZE = 100
POLL_S = 1.0  # how often held-back notices are looked at
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
SENT_TYPE = "org.dmbridge.admin_notices"  # the bot's account data: when each kind last went out

# Kinds of notice, each deduplicated on its own (per network where one is named).
DEAD_LETTER = "dead_letter"
WEBHOOK_DOWN = "webhook_down"
WEBHOOK_UP = "webhook_up"
HOMESERVER_DOWN = "homeserver_down"
STARTUP = "startup"


@dataclass(frozen=True)
class NoticeSettings:
    """admin_notices: who is told, and how often."""

    user: str = ""
    """A Matrix user the bot writes to in a DM; empty: none."""
    room: str = ""
    """A room ID the bot posts into; empty: none."""
    repeat_window: float = 600.0
    """Seconds after a notice within which the same kind is only counted, then summarised."""
    outage_after: float = 300.0
    """Seconds a webhook (or the homeserver) must be failing before a notice says so."""

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.room)


Send = Callable[[str, str], Awaitable[None]]
"""Send one notice: (kind, text). Raises when it could not."""


@dataclass
class _Held:
    count: int
    latest: str


class AdminNotices:
    """The interface the rest of the bridge calls. Safe to call when notices are off."""

    def __init__(self, settings: NoticeSettings, send: Send | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._send = send if settings.enabled else None
        self._clock = clock
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(QUEUE_SIZE)
        self._last: dict[str, float] = {}  # kind -> when a notice of it was last queued
        self._held: dict[str, _Held] = {}
        self._dropped = 0
        self._failing: dict[str, tuple[float, str, bool]] = {}  # key -> (since, error, told)
        self._task: asyncio.Task[None] | None = None

    # --- what the rest of the bridge calls -------------------------------------------------

    def report(self, kind: str, text: str) -> None:
        """Queue a notice; within ``repeat_window`` of the last of its kind it is only counted.

        Never blocks, never raises: a full queue drops the notice (and says so later).
        """
        if self._send is None:
            return
        try:
            now = self._clock()
            last = self._last.get(kind)
            if last is not None and now - last < self.settings.repeat_window:
                held = self._held.setdefault(kind, _Held(0, text))
                held.count += 1
                held.latest = text
                return
            self._last[kind] = now
            self._put(kind, text)
        except Exception:  # a notice must never be the caller's problem
            log.exception("could not queue an admin notice (%s)", kind)

    def dead_letter(self, network: str, item_id: int, what: str, error: str) -> None:
        self.report(f"{DEAD_LETTER}:{network}",
                    f"dmbridge: outbox {item_id} ({what}) for network '{network}' is a dead "
                    f"letter: {error}. `dmbridge dead-letters --network {network}` lists them "
                    "and queues them again.")

    def delivery_failed(self, network: str, error: str) -> None:
        """A webhook delivery to ``network`` failed; told once it has failed for a while."""
        self._failed(f"{WEBHOOK_DOWN}:{network}", error,
                     lambda minutes, err: f"dmbridge: deliveries to network '{network}' have "
                     f"been failing for {minutes}: {err}. Replies wait in its queue.")

    def delivery_ok(self, network: str) -> None:
        self._recovered(f"{WEBHOOK_DOWN}:{network}", f"{WEBHOOK_UP}:{network}",
                        lambda minutes: f"dmbridge: deliveries to network '{network}' work "
                        f"again (they failed for {minutes}).")

    def homeserver_unreachable(self, error: str) -> None:
        """Background work could not reach the homeserver. Told (once it can be reached
        again) if this lasts ``outage_after`` seconds or more."""
        key = HOMESERVER_DOWN
        if self._send is None:
            return
        if key not in self._failing:
            self._failing[key] = (self._clock(), error, False)
        else:
            since, _, told = self._failing[key]
            self._failing[key] = (since, error, told)

    def homeserver_recovered(self) -> None:
        failing = self._failing.pop(HOMESERVER_DOWN, None)
        if failing is None:
            return
        since, error, _ = failing
        if self._clock() - since >= self.settings.outage_after:
            self.report(HOMESERVER_DOWN, "dmbridge: the homeserver could not be reached for "
                        f"{_minutes(self._clock() - since)} (last error: {error}); it can be "
                        "again.")

    async def watch_homeserver(self, req: aiohttp.ClientRequest,
                               handler: ClientHandlerType) -> aiohttp.ClientResponse:
        """A client middleware: calls that cannot reach the homeserver (or that a proxy in
        front of it answers 502, 503 or 504) mark it unreachable, any other answer reachable."""
        try:
            resp = await handler(req)
        except aiohttp.ClientConnectionError as e:
            self.homeserver_unreachable(f"{req.method} {req.url.path}: {e}")
            raise
        # The self-check's 502 is the homeserver failing to reach the bridge, not the reverse.
        if resp.status in (502, 503, 504) and "/appservice/" not in req.url.path:
            self.homeserver_unreachable(f"{req.method} {req.url.path}: {resp.status}")
        elif HOMESERVER_DOWN in self._failing:
            self.homeserver_recovered()
        return resp

    def startup_problem(self, text: str) -> None:
        self.report(STARTUP, f"dmbridge: {text}")

    # --- running ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._send is not None and self._task is None:
            self._task = asyncio.create_task(self._run())
            where = self.settings.user or self.settings.room
            log.info("admin notices go to %s", where)

    async def stop(self, grace: float = 5.0) -> None:
        """Send what is queued (up to ``grace`` seconds), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):  # join() counts the notice being sent too
            await asyncio.wait_for(self._queue.join(), grace)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    # --- inside -----------------------------------------------------------------------------

    def _put(self, kind: str, text: str) -> None:
        try:
            self._queue.put_nowait((kind, text))
        except asyncio.QueueFull:
            self._dropped += 1
            log.warning("admin notice dropped, %d waiting already: %s", QUEUE_SIZE, text)

    def _failed(self, key: str, error: str, text: Callable[[str, str], str]) -> None:
        if self._send is None:
            return
        now = self._clock()
        since, _, told = self._failing.get(key, (now, error, False))
        self._failing[key] = (since, error, told)
        if not told and now - since >= self.settings.outage_after:
            self._failing[key] = (since, error, True)
            self.report(key, text(_minutes(now - since), error))

    def _recovered(self, key: str, kind: str, text: Callable[[str], str]) -> None:
        failing = self._failing.pop(key, None)
        if failing is not None and failing[2]:
            self.report(kind, text(_minutes(self._clock() - failing[0])))

    def _flush_held(self) -> float | None:
        """Queue the summaries whose window ended; seconds until the next one is due."""
        now = self._clock()
        wait: float | None = None
        for kind, held in list(self._held.items()):
            due = self._last[kind] + self.settings.repeat_window
            if now >= due:
                del self._held[kind]
                self._last[kind] = now
                self._put(kind, f"{held.latest} ({held.count} notice(s) of this kind in "
                          f"{_minutes(self.settings.repeat_window)}; this is the latest.)")
            else:
                wait = due - now if wait is None else min(wait, due - now)
        return wait

    async def _run(self) -> None:
        while True:
            wait = self._flush_held()
            try:
                kind, text = await asyncio.wait_for(self._queue.get(),
                                                    min(wait or POLL_S, POLL_S))
            except TimeoutError:
                continue
            try:
                await self._deliver(kind, text)
            finally:
                self._queue.task_done()

    async def _deliver(self, kind: str, text: str) -> None:
        """Send one notice, trying again (with growing pauses) until it goes or we stop."""
        assert self._send is not None
        if self._dropped:
            text += f" ({self._dropped} other notice(s) were dropped: too many at once.)"
        delay = RETRY_MIN_S
        while True:
            try:
                await self._send(kind, text)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("could not send an admin notice (trying again in %.0f s): %s",
                            delay, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self._dropped = 0
            return


def _minutes(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes >= 1 else f"{round(seconds)} s"


class NoticeRoom:
    """Sends notices as the bridge bot, into a DM with the admin or into a given room.

    When a start-up problem was last told is kept in the bot's account data, so a bridge that
    restarts again and again (under systemd's Restart=) says so once per repeat_window.
    """

    def __init__(self, homeserver_url: str, as_token: str, bot_user_id: str,
                 settings: NoticeSettings) -> None:
        self._base = homeserver_url.rstrip("/") + "/_matrix/client/v3"
        self._headers = {"Authorization": f"Bearer {as_token}"}
        self._bot = bot_user_id
        self._settings = settings
        self._room_id: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._sent: dict[str, int] | None = None  # kind -> when last sent (ms), as stored
        self._told: set[str] = set()  # kinds this process told: AdminNotices spaced them out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __call__(self, kind: str, text: str) -> None:
        sent = await self._sent_at()
        now = int(time.time() * 1000)
        # Across restarts (a start-up failing in a loop) only the stored time spaces them out.
        if kind == STARTUP and kind not in self._told and (
                now - sent.get(kind, 0) < self._settings.repeat_window * 1000):
            log.info("admin notice not sent, the last start-up problem was told shortly "
                     "before: %s", text)
            return
        room_id = self._room_id or await self._find_room()
        self._room_id = room_id
        path = f"/rooms/{quote(room_id)}/send/m.room.message/{secrets.token_hex(8)}"
        try:
            await self._request("PUT", path, {"msgtype": "m.notice", "body": text})
        except NoticeFailed as e:
            if e.status in (403, 404):  # the admin left, or the bot was removed: find it anew
                self._room_id = None
            raise
        sent[kind] = now
        self._told.add(kind)
        try:
            await self._request("PUT", self._account_data(SENT_TYPE), sent)
        except (NoticeFailed, aiohttp.ClientError, TimeoutError) as e:
            log.debug("could not record when the admin notice went out: %s", e)

    async def _sent_at(self) -> dict[str, int]:
        if self._sent is None:
            data = await self._account_data_or_empty(SENT_TYPE)
            self._sent = {k: v for k, v in data.items() if isinstance(v, int)}
        return self._sent

    def _account_data(self, event_type: str) -> str:
        return f"/user/{quote(self._bot)}/account_data/{event_type}"

    async def _account_data_or_empty(self, event_type: str) -> dict[str, Any]:
        try:
            return await self._request("GET", self._account_data(event_type))
        except NoticeFailed as e:
            if e.status == 404:
                return {}
            raise

    async def _find_room(self) -> str:
        if self._settings.room:
            data = await self._request("POST", f"/join/{quote(self._settings.room)}", {})
            return str(data.get("room_id", self._settings.room))
        return await self._existing_dm() or await self._new_dm()

    async def _existing_dm(self) -> str | None:
        """The latest room the bot's m.direct lists for the admin, while both are in it."""
        direct = await self._direct()
        for room_id in reversed(direct.get(self._settings.user, [])):
            if (await self._membership(room_id, self._bot) == "join"
                    and await self._membership(room_id, self._settings.user) in ("join",
                                                                                "invite")):
                return str(room_id)
        return None

    async def _new_dm(self) -> str:
        user = self._settings.user
        data = await self._request("POST", "/createRoom", {
            "preset": "private_chat", "is_direct": True, "invite": [user],
            "name": "dmbridge notices",
        })
        room_id = str(data["room_id"])
        direct = await self._direct()  # read, merge, write: keep the bot's other entries
        direct[user] = [r for r in direct.get(user, []) if r != room_id] + [room_id]
        await self._request("PUT", self._account_data("m.direct"), direct)
        log.info("opened %s for admin notices to %s", room_id, user)
        return room_id

    async def _direct(self) -> dict[str, list[str]]:
        data = await self._account_data_or_empty("m.direct")
        return {k: [r for r in v if isinstance(r, str)] for k, v in data.items()
                if isinstance(v, list)}

    async def _membership(self, room_id: str, user_id: str) -> str | None:
        try:
            data = await self._request(
                "GET", f"/rooms/{quote(room_id)}/state/m.room.member/{quote(user_id)}")
        except NoticeFailed as e:
            if e.status in (403, 404):
                return None
            raise
        membership = data.get("membership")
        return membership if isinstance(membership, str) else None

    async def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=REQUEST_TIMEOUT)
        async with self._session.request(method, self._base + path, json=body,
                                         headers=self._headers) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise NoticeFailed(resp.status, f"{method} {path}: {resp.status} {data}")
            return data if isinstance(data, dict) else {}


class NoticeFailed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
