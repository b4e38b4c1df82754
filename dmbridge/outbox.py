"""Getting what platforms are owed to them: webhook pushes with retries, pulls with acks.

Items come from the outbox table, written in the same transaction as the homeserver events that
caused them. Nothing is forgotten on a crash: a delivery holds a short lease on its item, and an
item whose lease ran out is simply delivered again (receivers drop repeats by idempotency key).

Webhook pushes are :mod:`.delivery`'s; pulls, acknowledgements and dead letters are here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from mautrix.util.async_db import Connection

from . import payloads, wake
from .config import DeliverySettings
from .db import Stores, now_ms
from .db.outbox import OutboxItem
from .delivery import Deliverer
from .errors import InvalidParam
from .metrics import Metrics
from .networks import PULL, PUSH, Network, Networks
from .notices import AdminNotices, NoticeSettings
from .undelivered import Undelivered
from .webhook import Present, as_stored

log = logging.getLogger("dmbridge.outbox")

POLL_S = 1.0  # how often a long poll looks at the database without being woken
SWEEP_S = 5.0  # how often pull networks' expired items are looked for


class Outbox:
    """What platforms are owed: pushed by webhook (:class:`~.delivery.Deliverer`), or pulled
    and acknowledged; and the dead letters of both."""

    def __init__(self, *, stores: Stores, networks: Networks, settings: DeliverySettings,
                 present: Present = as_stored, notices: AdminNotices | None = None,
                 metrics: Metrics | None = None,
                 announce: Callable[[set[str]], None] | None = None,
                 undelivered: Undelivered | None = None) -> None:
        self.stores = stores
        # Tells the Matrix user about their messages that became dead letters (and got through
        # after all, once queued again).
        self.undelivered = undelivered or Undelivered(stores=stores, networks=networks)
        self.notices = notices or AdminNotices(NoticeSettings(), None)
        self.metrics = metrics if metrics is not None else Metrics()
        # Last touches as an event is handed out (fresh media links), pushed or pulled.
        self._present = present
        self.networks = networks
        self.settings = settings
        self._push = [n.id for n in networks if n.delivery.mode == PUSH]
        self._pull = [n.id for n in networks if n.delivery.mode == PULL]
        self._pull_signals: dict[str, asyncio.Event] = {n.id: asyncio.Event() for n in networks}
        self._sweeper: asyncio.Task[None] | None = None
        # Tells the other workers on the same database (see :mod:`dmbridge.peers`).
        self._announce = announce or (lambda networks: None)
        self.deliverer = Deliverer(
            stores=stores, networks=networks, push=self._push, settings=settings,
            present=present, notices=self.notices, metrics=self.metrics,
            dead_letter=self.dead_letter, announce=self._announce, undelivered=self.undelivered,
        )

    def present(self, item: OutboxItem) -> dict[str, Any]:
        """The event as the platform receives it now."""
        return self._present(item.event())

    # --- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.deliverer.start()
        self._sweeper = asyncio.create_task(self._sweep())
        log.info("delivering to %d webhook network(s) %s; %d pull network(s) %s",
                 len(self._push), self._push, len(self._pull), self._pull)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.deliverer.stop()

    def wake(self, networks: set[str]) -> None:
        """New items were committed for these networks, here: this worker and the others."""
        self.wake_here(networks)
        self._announce(networks)

    def wake_here(self, networks: set[str]) -> None:
        """New items were committed for these networks (by another worker, maybe)."""
        pushed = {network for network in networks if network in self._push}
        if pushed:
            self.deliverer.wake(pushed)
        for network in networks:
            signal = self._pull_signals.get(network)
            if signal is not None:
                signal.set()

    # --- handed over by the recording of homeserver transactions (see effects.Handoff) -----

    def lease(self, network: str, now: int) -> tuple[int, str] | None:
        return self.deliverer.lease(network, now)

    def unused(self, token: str) -> None:
        self.deliverer.unused(token)

    def take(self, items: list[OutboxItem]) -> None:
        self.deliverer.take(items)

    # --- becoming a dead letter -------------------------------------------------------------

    async def dead_letter(self, item: OutboxItem, attempts: int, why: str) -> None:
        """Make the item a dead letter, and tell the platform (once it can be reached): the
        one place where an item becomes a dead letter (by its lease holder, when leased). The
        Matrix user's notice is owed in the same transaction: no crash loses it."""
        conn: Connection
        async with self.stores.db.acquire() as conn, conn.transaction():
            if not await self.stores.outbox.kill(item.id, attempts, why, now_ms(),
                                                 item.lease_token, conn):
                return
            told = await self.undelivered.dead_letter(conn, item)
        if told:
            self.undelivered.wake()
        self.metrics.delivery(item.network, "dead_lettered")
        log.error("outbox %d (%s %s for %s) is now a dead letter: %s", item.id, item.type,
                  item.idempotency_key, item.network, why)
        self.notices.dead_letter(item.network, item.id, f"{item.type} for {item.user_id}", why)
        if item.type == payloads.DELIVERY_FAILED:
            return  # never a notice about a notice
        event = item.event()
        lane = payloads.Lane(item.network, item.remote_id, item.user_id,
                             str(event.get("ghost_id", "")))
        now = now_ms()
        payload = payloads.delivery_failed(lane, event, attempts, why, now)
        await self.stores.outbox.add_now(
            network=item.network, remote_id=item.remote_id, user_id=item.user_id,
            type=payloads.DELIVERY_FAILED, key=payload["idempotency_key"], payload=payload,
            now=now,
        )
        self.wake({item.network})

    async def _sweep(self) -> None:
        while True:
            try:
                await self._expire_pulled()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not look for pulled items not acknowledged in time")
            await asyncio.sleep(SWEEP_S)

    async def _expire_pulled(self) -> None:
        cutoff = now_ms() - int(self.settings.max_age * 1000)
        for item in await self.stores.outbox.expired(self._pull, cutoff, 100):
            await self.dead_letter(item, item.attempts,
                                   f"not acknowledged within {self.settings.max_age:g} s")

    # --- pull -------------------------------------------------------------------------------

    async def pull(self, network: Network, after: int, wait: float, limit: int
                   ) -> list[OutboxItem]:
        """Long-poll: items after the cursor (and any due again), waiting up to ``wait`` s."""
        self.check_pull(network)
        wait = min(max(0.0, wait), self.settings.pull_max_wait)
        deadline = time.monotonic() + wait
        signal = self._pull_signals[network.id]
        redeliver_ms = int(self.settings.pull_ack_timeout * 1000)
        while True:
            signal.clear()
            now = now_ms()
            items = await self.stores.outbox.pull(network.id, after, now, now - redeliver_ms,
                                                  limit)
            remaining = deadline - time.monotonic()
            if items or remaining <= 0:
                return items
            await wake.wait(signal, min(POLL_S, remaining))

    @staticmethod
    def check_pull(network: Network) -> None:
        if network.delivery.mode != PULL:
            raise InvalidParam(f"network '{network.id}' receives events by webhook, not by pull")

    async def ack(self, network: Network, ids: list[int]) -> int:
        self.check_pull(network)
        conn: Connection
        async with self.stores.db.acquire() as conn, conn.transaction():
            count = await self.stores.outbox.ack(network.id, ids, now_ms(), conn)
            corrected = await self.undelivered.acknowledged(conn, network.id, ids)
        if corrected:
            self.undelivered.wake()
        self.metrics.delivery(network.id, "delivered", count)
        log.info("%s acknowledged %d of %d event(s)", network.id, count, len(ids))
        return count

    # --- dead letters -----------------------------------------------------------------------

    async def dead_letters(self, network: Network, limit: int) -> list[OutboxItem]:
        return await self.stores.outbox.dead_letters(network.id, limit)

    async def retry(self, network: Network, ids: list[int] | None) -> list[int]:
        requeued = await self.stores.outbox.requeue(network.id, ids, now_ms())
        if requeued:
            log.info("%s: %d dead letter(s) queued again: %s", network.id, len(requeued),
                     requeued)
            self.wake({network.id})
        return requeued


def describe(item: OutboxItem) -> dict[str, object]:
    """A dead letter as the API and CLI show it."""
    return {
        "id": item.id,
        "type": item.type,
        "idempotency_key": item.idempotency_key,
        "remote_id": item.remote_id,
        "user_id": item.user_id,
        "attempts": item.attempts,
        "error": item.last_error,
        "created_at": item.created_at,
        "failed_at": item.finished_at,
        "event": item.event(),
    }
