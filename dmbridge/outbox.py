"""Getting what platforms are owed to them: webhook pushes with retries, pulls with acks.

Items come from the outbox table, written in the same transaction as the homeserver events that
caused them. Nothing is forgotten on a crash: a delivery holds a short lease on its item, and an
item whose lease ran out is simply delivered again (receivers drop repeats by idempotency key).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from mautrix.util.async_db import Connection

from . import payloads, wake
from .config import DeliverySettings
from .db import Stores, now_ms
from .db.outbox import OutboxItem
from .errors import InvalidParam
from .metrics import Metrics
from .networks import PULL, PUSH, Network, Networks
from .notices import AdminNotices, NoticeSettings
from .undelivered import Undelivered
from .webhook import Outcome, Present, WebhookClient, as_stored

log = logging.getLogger("dmbridge.outbox")

POLL_S = 1.0  # how often the database is checked for work other workers (or the CLI) queued
SWEEP_S = 5.0  # how often pull networks' expired items are looked for
LEASE_SLACK_S = 5.0


def backoff(attempt: int, settings: DeliverySettings, rng: random.Random | None = None) -> float:
    """Seconds before retry ``attempt`` + 1: doubling from initial_backoff, capped, jittered.

    The jitter takes the wait from half to all of the nominal delay ("equal jitter"), so
    receivers coming back are not hit by every bridge at once, and waits still grow.
    """
    nominal = min(settings.max_backoff, settings.initial_backoff * 2 ** max(0, attempt - 1))
    return (rng or random).uniform(nominal / 2, nominal)


class Outbox:
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
        self._wake = asyncio.Event()
        self._pull_signals: dict[str, asyncio.Event] = {n.id: asyncio.Event() for n in networks}
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._webhook: WebhookClient | None = None
        self._owner = secrets.token_hex(4)
        # Tells the other workers on the same database (see :mod:`dmbridge.peers`).
        self._announce = announce or (lambda networks: None)

    def present(self, item: OutboxItem) -> dict[str, Any]:
        """The event as the platform receives it now."""
        return self._present(item.event())

    # --- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._webhook = WebhookClient(self._session, self.settings.timeout, self._present)
        self._task = asyncio.create_task(self._run())
        log.info("delivering to %d webhook network(s) %s; %d pull network(s) %s",
                 len(self._push), self._push, len(self._pull), self._pull)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        in_flight = list(self._in_flight)
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.stores.outbox.release(in_flight)
        except Exception as e:  # the leases then simply run out
            log.warning("could not release %d delivery lease(s): %r", len(in_flight), e)
        if self._session is not None:
            await self._session.close()

    def wake(self, networks: set[str]) -> None:
        """New items were committed for these networks, here: this worker and the others."""
        self.wake_here(networks)
        self._announce(networks)

    def wake_here(self, networks: set[str]) -> None:
        """New items were committed for these networks (by another worker, maybe)."""
        self._wake.set()
        for network in networks:
            signal = self._pull_signals.get(network)
            if signal is not None:
                signal.set()

    async def _run(self) -> None:
        last_sweep = 0.0
        while True:
            try:
                if time.monotonic() - last_sweep >= SWEEP_S:
                    last_sweep = time.monotonic()
                    await self._expire_pulled()
                wait = await self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the delivery loop failed; trying again shortly")
                wait = POLL_S
            await wake.wait(self._wake, wait)
            self._wake.clear()

    async def _dispatch(self) -> float:
        """Start delivering every due lane head we have room for; seconds until worth a look."""
        free = self.settings.concurrency - len(self._in_flight)
        now = now_ms()
        if free > 0:
            heads = await self.stores.outbox.due_heads(self._push, now, free + len(self._in_flight))
            lease_ms = int((self.settings.timeout + LEASE_SLACK_S) * 1000)
            for item in heads:
                if free <= 0:
                    break
                if item.id in self._in_flight:
                    continue
                if await self.stores.outbox.lease(item.id, now, now + lease_ms):
                    self._in_flight[item.id] = asyncio.create_task(self._deliver(item))
                    free -= 1
        if self._in_flight:
            return POLL_S  # each delivery wakes the loop when it ends; no need to ask now
        next_due = await self.stores.outbox.next_due_at(self._push)
        if next_due is None:
            return POLL_S
        return min(POLL_S, max(0.01, (next_due - now_ms()) / 1000))

    async def _deliver(self, item: OutboxItem) -> None:
        network = self.networks.get(item.network)
        attempt = item.attempts + 1
        try:
            assert self._webhook is not None
            outcome = await self._webhook.post(network, item, attempt)
            if outcome.ok:
                await self._delivered(item, attempt)
                self.metrics.delivery(item.network, "delivered")
                log.info("delivered outbox %d (%s %s) to %s on attempt %d", item.id, item.type,
                         item.idempotency_key, item.network, attempt)
                self.notices.delivery_ok(item.network)
            else:
                await self._failed(network, item, attempt, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivering outbox %d failed unexpectedly; its lease will run out",
                          item.id)
        finally:
            self._in_flight.pop(item.id, None)
            self._wake.set()  # the lane's next item may go now

    async def _failed(self, network: Network, item: OutboxItem, attempt: int,
                      outcome: Outcome) -> None:
        self.notices.delivery_failed(network.id, outcome.error)
        now = now_ms()
        deadline = item.queued_at + int(self.settings.max_age * 1000)
        if attempt >= self.settings.max_attempts or now >= deadline:
            why = f"gave up after {attempt} attempt(s); last: {outcome.error}"
            await self._kill(item, attempt, why)
            return
        delay = backoff(attempt, self.settings)
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        next_at = min(now + int(delay * 1000), deadline)
        await self.stores.outbox.retry_later(item.id, attempt, next_at, outcome.error)
        self.metrics.delivery(network.id, "retried")
        log.warning("delivery of outbox %d to %s failed (attempt %d: %s); next try in %.1f s",
                    item.id, network.id, attempt, outcome.error, (next_at - now) / 1000)

    async def _delivered(self, item: OutboxItem, attempt: int) -> None:
        """Record the delivery; a notice that said the item failed is corrected in the same
        transaction, so no crash leaves the user told it failed."""
        if not self.undelivered.may_correct(item):
            await self.stores.outbox.delivered(item.id, attempt, now_ms())
            return
        conn: Connection
        async with self.stores.db.acquire() as conn, conn.transaction():
            await self.stores.outbox.delivered(item.id, attempt, now_ms(), conn)
            corrected = await self.undelivered.delivered(conn, item)
        if corrected:
            self.undelivered.wake()

    async def _kill(self, item: OutboxItem, attempts: int, why: str) -> None:
        """Make the item a dead letter, and tell the platform (once it can be reached). The
        Matrix user's notice is owed in the same transaction: no crash loses it."""
        conn: Connection
        async with self.stores.db.acquire() as conn, conn.transaction():
            if not await self.stores.outbox.kill(item.id, attempts, why, now_ms(), conn):
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

    async def _expire_pulled(self) -> None:
        cutoff = now_ms() - int(self.settings.max_age * 1000)
        for item in await self.stores.outbox.expired(self._pull, cutoff, 100):
            await self._kill(item, item.attempts,
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
