"""Telling the Matrix user, in the room, that a message of theirs did not reach the contact.

A message the platform never accepted (a dead letter) gets an ``m.notice`` from the ghost, in
reply to that message: every client shows it. If a dead letter is queued again and then
delivered, the notice is edited to say it got through after all. A room the bridge no longer
delivers from (it has other members, or the DM with the contact is another room now) is told
so once, in reply to the first message written there since that change.

Each event is told about once: the notice owed is a database row keyed by the event, written
in the transaction of what caused it, and sent by whichever worker leases it first, under a
transaction ID made from the ghost and the event, so even a send repeated after a crash lands
once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import aiohttp
from mautrix.errors import MatrixRequestError
from mautrix.types import RoomID, UserID
from mautrix.util.async_db import Connection

from . import payloads, wake
from .db import Stores, now_ms
from .db.outbox import OutboxItem
from .db.undelivered import (
    DEAD_LETTER,
    DELIVERED,
    ELSEWHERE,
    FAILED,
    NOT_A_DM,
    UndeliveredNotice,
)
from .errors import RateLimited
from .homeserver import Homeserver
from .networks import Networks

log = logging.getLogger("dmbridge.undelivered")

POLL_S = 10.0  # how often notices queued by other workers are looked for without a wake-up
BATCH = 50  # notices sent per round, at most
# One attempt at a send: the rate limits may hold it up to rate_limits.background_wait, then
# the request itself gets this long; past both it is abandoned (and tried again later).
SEND_TIMEOUT_S = 60.0
# An attempt's hold on a notice outlasts the longest send by this much, so no other worker
# takes the notice while a send may still land; a worker that dies lets go when it ends.
LEASE_SLACK_S = 30.0
MAX_ATTEMPTS = 12  # about 25 minutes of tries; then the notice is given up (logged)
RETRY_MIN_MS, RETRY_MAX_MS = 2_000, 300_000
# The outbox items that are a Matrix user's own message (their idempotency key is its event ID).
USER_MESSAGES = frozenset({payloads.MESSAGE, payloads.EDIT})

WARNING = "\N{WARNING SIGN}\N{VARIATION SELECTOR-16}"
CHECK = "\N{WHITE HEAVY CHECK MARK}"


def failure_text(reason: str, name: str) -> str:
    """What the user reads under their message; ``name`` is the network's display name."""
    if reason == NOT_A_DM:
        return (f"{WARNING} Not delivered: someone else joined this room, so it is no longer a "
                f"direct chat with this {name} contact. Messages here do not reach them.")
    if reason == ELSEWHERE:
        return (f"{WARNING} Not delivered: the conversation with this {name} contact goes on in "
                "another room. Write there to reach them.")
    return (f"{WARNING} Not delivered: {name} did not accept this message. The bridge's "
            "administrator can send it again; you will see here if it gets through.")


def delivered_text(name: str) -> str:
    return f"{CHECK} Delivered after all: {name} accepted this message on a later attempt."


def txn_id(what: str, notice: UndeliveredNotice) -> str:
    """Deterministic per ghost, event and kind of notice: a repeated send lands once."""
    digest = hashlib.sha256(f"{what}\0{notice.ghost_id}\0{notice.event_id}".encode())
    return f"dmbridge.undelivered.{digest.hexdigest()[:40]}"


class Undelivered:
    """What the outbox and the lifecycle call, and the task that sends the notices."""

    def __init__(self, *, stores: Stores, networks: Networks,
                 background_wait: float = 60.0) -> None:
        self.stores = stores
        self.networks = networks
        self._send_s = background_wait + SEND_TIMEOUT_S
        self._lease_ms = int((self._send_s + LEASE_SLACK_S) * 1000)
        self._homeserver: Homeserver | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- what the rest of the bridge calls ------------------------------------------------

    async def dead_letter(self, conn: Connection, item: OutboxItem) -> bool:
        """The outbox gives up on ``item``, in the transaction on ``conn`` that makes it a
        dead letter: if it is the user's message, a notice is owed (True: call :meth:`wake`
        once committed). A failure here fails that transaction: the item stays pending."""
        if item.type not in USER_MESSAGES:
            return False
        try:
            event = item.event()
        except (ValueError, TypeError):  # not a JSON object: no room to tell
            event = {}
        room_id, ghost_id = event.get("room_id"), event.get("ghost_id")
        if not isinstance(room_id, str) or not isinstance(ghost_id, str):
            log.warning("dead letter %d names no room: the user is not told", item.id)
            return False
        return await self.stores.undelivered.add(conn, item.idempotency_key, room_id, ghost_id,
                                                 DEAD_LETTER, now_ms())

    @staticmethod
    def may_correct(item: OutboxItem) -> bool:
        """Whether delivering ``item`` may correct a notice: it is the user's message, queued
        again after it became a dead letter. Any other item costs no database work."""
        return item.type in USER_MESSAGES and item.queued_at != item.created_at

    async def delivered(self, conn: Connection, item: OutboxItem) -> bool:
        """A webhook took ``item`` (recorded in the transaction on ``conn``). If it was a dead
        letter queued again, a notice that said it failed is to be corrected (True: call
        :meth:`wake` once committed)."""
        if not self.may_correct(item):
            return False
        return await self.stores.undelivered.delivered(conn, [item.idempotency_key], now_ms()) > 0

    async def acknowledged(self, conn: Connection, network: str, ids: list[int]) -> bool:
        """A pull network acknowledged ``ids`` (recorded in the transaction on ``conn``): any
        of them told as failed got through (True: call :meth:`wake` once committed)."""
        return await self.stores.undelivered.delivered_items(conn, network, ids, now_ms()) > 0

    def wake(self) -> None:
        self._wake.set()

    # --- running ----------------------------------------------------------------------------

    def start(self, homeserver: Homeserver) -> None:
        self._homeserver = homeserver
        self._wake.set()  # what was owed before a restart
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await wake.wait(self._wake, POLL_S)
            self._wake.clear()
            try:
                await self.send_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sending notices about undelivered messages failed; trying again"
                              " in %.0f s", POLL_S)

    async def send_due(self) -> int:
        """Send the notices owed now (one batch); how many went out or were settled."""
        done = 0
        now = now_ms()
        for notice in await self.stores.undelivered.due(now, BATCH):
            if not await self.stores.undelivered.lease(notice, now, now + self._lease_ms):
                continue
            try:
                done += await self._show(notice)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # this notice only: the others of the batch still go
                log.exception("%s: telling the user about %s failed unexpectedly",
                              notice.room_id, notice.event_id)
                try:
                    await self._later(notice, repr(e))
                except Exception:
                    log.exception("%s: could not schedule the notice about %s again; it is"
                                  " due again when its lease runs out", notice.room_id,
                                  notice.event_id)
        return done

    async def _show(self, notice: UndeliveredNotice) -> int:
        parsed = self.networks.parse_ghost(notice.ghost_id)
        if parsed is None:  # the network is no longer configured: nobody to speak for it
            await self.stores.undelivered.shown(notice, None, now_ms())
            return 0
        name = parsed[0].name
        if notice.told == DELIVERED and notice.notice_event_id is None:
            # Delivered before the user was told it failed (or the notice saying so was given
            # up): nothing in the room to correct, and nothing to say.
            await self.stores.undelivered.shown(notice, None, now_ms())
            return 1
        content = self._content(notice, name)
        try:
            assert self._homeserver is not None
            event_id = await asyncio.wait_for(self._homeserver.send_event(
                UserID(notice.ghost_id), RoomID(notice.room_id), "m.room.message",
                txn_id(notice.told, notice), content, attempts=1), self._send_s)
        except asyncio.CancelledError:
            raise
        except MatrixRequestError as e:
            if 400 <= e.http_status < 500 and e.http_status != 429:
                # The ghost is no longer in the room, or may not write there: nobody to tell.
                log.warning("%s: could not tell %s that %s was %s: %s; given up",
                            notice.room_id, notice.ghost_id, notice.event_id,
                            notice.told, e)
                await self.stores.undelivered.shown(notice, None, now_ms())
                return 0
            await self._later(notice, repr(e))
            return 0
        except (aiohttp.ClientError, TimeoutError, RateLimited) as e:
            await self._later(notice, repr(e))
            return 0
        await self.stores.undelivered.shown(notice, event_id, now_ms())
        log.info("%s: told the user that %s %s (%s; notice %s)", notice.room_id,
                 notice.event_id, "was delivered after all" if notice.told == DELIVERED
                 else "was not delivered", notice.reason, event_id)
        return 1

    @staticmethod
    def _content(notice: UndeliveredNotice, name: str) -> dict[str, Any]:
        """The failure, in reply to the message; or the edit of that notice (there is one)."""
        if notice.told == FAILED:
            return {"msgtype": "m.notice", "body": failure_text(notice.reason, name),
                    "m.relates_to": {"m.in_reply_to": {"event_id": notice.event_id}}}
        text = delivered_text(name)
        return {
            "msgtype": "m.notice", "body": f"* {text}",
            "m.new_content": {"msgtype": "m.notice", "body": text},
            "m.relates_to": {"rel_type": "m.replace", "event_id": notice.notice_event_id},
        }

    async def _later(self, notice: UndeliveredNotice, error: str) -> None:
        attempts = notice.attempts + 1  # the lease counted this one
        if attempts >= MAX_ATTEMPTS:
            log.error("%s: could not tell the user about %s after %d attempts (last: %s);"
                      " given up", notice.room_id, notice.event_id, attempts, error)
            await self.stores.undelivered.shown(notice, None, now_ms())
            return
        delay = min(RETRY_MAX_MS, RETRY_MIN_MS * 2 ** (attempts - 1))
        log.warning("%s: could not tell the user about %s yet (%s); again in %.0f s",
                    notice.room_id, notice.event_id, error, delay / 1000)
        await self.stores.undelivered.later(notice, now_ms() + delay)


__all__ = ["DEAD_LETTER", "ELSEWHERE", "NOT_A_DM", "Undelivered"]
