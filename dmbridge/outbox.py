"""Getting what platforms are owed to them: webhook pushes with retries, pulls with acks.

Items come from the outbox table, written in the same transaction as the homeserver events that
caused them. Nothing is forgotten on a crash: a delivery holds a short lease on its item, and an
item whose lease ran out is simply delivered again (receivers drop repeats by idempotency key).

A webhook item reaches this worker's deliverer in one of three ways: handed over by the
recording of a homeserver transaction as soon as it commits, already leased if it was the first
of its lane (:meth:`Outbox.take`); as the next items of a lane just delivered here, leased
several at a time (:mod:`.lanes`); or found by a look at the database (another worker's items,
retries come due, the API's notices). Delivered items are marked so in batches; until then
their leases keep other workers out of their lanes. Every change to a leased row names the
lease's token, so that only its holder makes it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiohttp

from . import payloads, wake
from .config import DeliverySettings
from .db import Stores, now_ms
from .db.outbox import CHUNK, OutboxItem
from .errors import InvalidParam
from .lanes import Lane, LaneKey, lane_key
from .metrics import Metrics
from .networks import PULL, PUSH, Network, Networks
from .notices import AdminNotices, NoticeSettings
from .webhook import Outcome, Present, WebhookClient, as_stored

log = logging.getLogger("dmbridge.outbox")

POLL_S = 1.0  # how often the database is checked for work other workers (or the CLI) queued
SWEEP_S = 5.0  # how often pull networks' expired items are looked for
LEASE_SLACK_S = 5.0  # a lease lasts the delivery timeout and this much more
LANE_BATCH = 16  # items of one lane leased at a time, to go out one after the other
HELD_PER_SLOT = 2 * LANE_BATCH  # leased items held here per delivery slot, at most


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
                 announce: Callable[[set[str]], None] | None = None) -> None:
        self.stores = stores
        self.notices = notices or AdminNotices(NoticeSettings(), None)
        self.metrics = metrics if metrics is not None else Metrics()
        # Last touches as an event is handed out (fresh media links), pushed or pulled.
        self._present = present
        self.networks = networks
        self.settings = settings
        self._push = [n.id for n in networks if n.delivery.mode == PUSH]
        self._pull = [n.id for n in networks if n.delivery.mode == PULL]
        self._lease_ms = int((settings.timeout + LEASE_SLACK_S) * 1000)
        # A lease must have this much left when its POST starts (else it is renewed first).
        self._needed_ms = int((settings.timeout + 1) * 1000)
        self._held_max = settings.concurrency * HELD_PER_SLOT
        self._kick = asyncio.Event()  # the delivery loop has something to do
        self._look = True  # the database is to be searched for due items
        self._look_at = 0.0  # when it is next worth searching anyway (monotonic)
        self._pull_signals: dict[str, asyncio.Event] = {n.id: asyncio.Event() for n in networks}
        self._lanes: dict[LaneKey, Lane] = {}
        self._ready: deque[LaneKey] = deque()  # lanes whose next item waits for a free slot
        self._held = 0  # items leased here, waiting or being delivered
        self._in_flight: dict[int, tuple[OutboxItem, asyncio.Task[None]]] = {}
        self._unmarked: dict[int, tuple[str, LaneKey]] = {}  # delivered: id -> (token, lane)
        self._marker: asyncio.Task[None] | None = None
        self._unsent: list[OutboxItem] = []  # leased, never sent: given back
        self._running = False
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._webhook: WebhookClient | None = None
        self._owner = secrets.token_hex(8)
        self._leases = itertools.count(1)
        # Tells the other workers on the same database (see :mod:`dmbridge.peers`).
        self._announce = announce or (lambda networks: None)

    def present(self, item: OutboxItem) -> dict[str, Any]:
        """The event as the platform receives it now."""
        return self._present(item.event())

    # --- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._webhook = WebhookClient(self._session, self.settings.timeout, self._present)
        self._running, self._look = True, True
        self._task = asyncio.create_task(self._run())
        log.info("delivering to %d webhook network(s) %s; %d pull network(s) %s",
                 len(self._push), self._push, len(self._pull), self._pull)

    async def stop(self) -> None:
        self._running = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        in_flight = [item for item, _ in self._in_flight.values()]
        tasks = [task for _, task in self._in_flight.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._marker is not None:
            await asyncio.gather(self._marker, return_exceptions=True)
        waiting = [*self._unsent, *(item for lane in self._lanes.values() for item in lane.queue)]
        self._lanes.clear()
        self._ready.clear()
        self._unsent, self._held = [], 0
        try:
            await self._mark()
        except Exception as e:  # their leases run out, and they are delivered again
            log.warning("could not mark %d delivered item(s) so: %r", len(self._unmarked), e)
        try:
            await self.stores.outbox.give_back(in_flight, uncount=False)
            await self.stores.outbox.give_back(waiting)
        except Exception as e:  # the leases then simply run out
            log.warning("could not release %d delivery lease(s): %r",
                        len(in_flight) + len(waiting), e)
        if self._session is not None:
            await self._session.close()

    def wake(self, networks: set[str]) -> None:
        """New items were committed for these networks, here: this worker and the others."""
        self.wake_here(networks)
        self._announce(networks)

    def wake_here(self, networks: set[str]) -> None:
        """New items were committed for these networks (by another worker, maybe)."""
        if any(network in self._push for network in networks):
            self._look = True
            for key, lane in self._lanes.items():  # they may be behind an item held here
                if key[0] in networks:
                    lane.more = True
            self._kick.set()
        for network in networks:
            signal = self._pull_signals.get(network)
            if signal is not None:
                signal.set()

    # --- handed over by the recording of homeserver transactions (see effects.Handoff) -----

    def lease(self, network: str, now: int) -> tuple[int, str] | None:
        if not self._running or network not in self._push or self._held >= self._held_max:
            return None
        return now + self._lease_ms, self._token()

    def take(self, items: list[OutboxItem]) -> None:
        if not self._running:  # stopping: their leases are given back, or run out
            self._unsent.extend(item for item in items if item.lease_token is not None)
            return
        others: set[str] = set()
        for item in items:
            if item.lease_token is not None:
                self._hold(item)
                continue
            # Behind another item of its lane: if this worker holds it, looked for after it;
            # if not, looked for now (another worker holding it is told, and does the same).
            self._lanes.setdefault(lane_key(item), Lane()).more = True
            others.add(item.network)
        self._kick.set()
        if others:
            self._announce(others)

    def _token(self) -> str:
        return f"{self._owner}-{next(self._leases)}"

    # --- the delivery loop ------------------------------------------------------------------

    async def _run(self) -> None:
        last_sweep = 0.0
        while True:
            try:
                if time.monotonic() - last_sweep >= SWEEP_S:
                    last_sweep = time.monotonic()
                    await self._expire_pulled()
                await self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the delivery loop failed; trying again shortly")
                self._look_at = time.monotonic() + POLL_S
            if not await wake.wait(self._kick, max(0.0, self._look_at - time.monotonic())):
                self._look = True
            self._kick.clear()

    async def _dispatch(self) -> None:
        """Give back what will not be sent, search the database when woken (or when it is
        time), look for the next items of lanes delivered here, and start what can go."""
        if self._unsent:
            unsent, self._unsent = self._unsent, []
            await self.stores.outbox.give_back(unsent)
        if self._unmarked and (self._marker is None or self._marker.done()):
            self._mark_soon()  # a failed batch, tried again
        if self._look or time.monotonic() >= self._look_at:
            await self._search()
        for key in [key for key, lane in self._lanes.items() if lane.wants_next]:
            if self._held >= self._held_max:
                break
            await self._next_in_lane(key)
        await self._start()

    async def _search(self) -> None:
        """Lease the due heads of lanes not held here, as many as there is room for."""
        free = min(self.settings.concurrency - len(self._in_flight) - len(self._ready),
                   self._held_max - self._held)
        if free <= 0:
            return  # searched once a slot frees up (self._look stays)
        self._look = False
        now = now_ms()
        heads = await self.stores.outbox.due_heads(self._push, now, free + len(self._lanes))
        for item in heads:
            if free <= 0:
                self._look = True  # more than there was room for: again once there is
                break
            if lane_key(item) in self._lanes:
                continue
            until, token = now + self._lease_ms, self._token()
            if await self.stores.outbox.lease(item.id, now, until, token):
                self._hold(replace(item, attempts=item.attempts + 1, lease_until=until,
                                   lease_token=token), more=True)
                free -= 1
        next_due = await self.stores.outbox.next_due_at(self._push)
        wait = POLL_S if next_due is None else min(POLL_S, max(0.01, (next_due - now) / 1000))
        self._look_at = time.monotonic() + wait

    async def _next_in_lane(self, key: LaneKey) -> None:
        """Lease the next items of a lane held here, after those delivered here."""
        lane = self._lanes[key]
        lane.more = False  # set again if told of more meanwhile
        lane.looking = True  # kept meanwhile
        now = now_ms()
        limit = min(LANE_BATCH, self._held_max - self._held)
        try:
            items = await self.stores.outbox.lease_next(key, lane.done, now,
                                                        now + self._lease_ms, self._token(), limit)
        finally:
            lane.looking = False
        for item in items:
            self._hold(item)
        if len(items) == limit:
            lane.more = True
        self._forget_if_idle(key)

    def _hold(self, item: OutboxItem, *, more: bool = False) -> None:
        """An item leased here: in its lane's queue, the lane ready if it is not busy."""
        key = lane_key(item)
        lane = self._lanes.setdefault(key, Lane())
        lane.queue.append(item)
        lane.more = lane.more or more
        self._held += 1
        if not lane.busy and not lane.ready:
            lane.ready = True
            self._ready.append(key)

    async def _start(self) -> None:
        """Start the ready lanes' next items while there are free slots."""
        while self._ready and len(self._in_flight) < self.settings.concurrency:
            key = self._ready.popleft()
            lane = self._lanes[key]
            lane.ready = False
            item = lane.queue.popleft()
            lane.busy = True
            now = now_ms()
            assert item.lease_until is not None and item.lease_token is not None
            if item.lease_until - now < self._needed_ms:
                # It waited for its turn: its POST must not outlast its lease.
                until = now + self._lease_ms
                if not await self.stores.outbox.renew(item.id, item.lease_token, until):
                    log.warning("outbox %d is no longer held here (its lease ran out); its"
                                " lane is left to whoever holds it", item.id)
                    lane.busy = False
                    self._held -= 1
                    self._stop_lane(key)
                    self._forget_if_idle(key)
                    continue
                item = replace(item, lease_until=until)
            self._in_flight[item.id] = (item, asyncio.create_task(self._deliver(item)))

    def _finished(self, item: OutboxItem, *, delivered: bool) -> None:
        """An item leased here is no longer: delivered, or failed (its lane then waits for
        its retry, found by a search, or for its death)."""
        key = lane_key(item)
        lane = self._lanes.setdefault(key, Lane())
        lane.busy = False
        self._held -= 1
        if delivered:
            assert item.lease_token is not None
            lane.done = max(lane.done, item.id)
            lane.unmarked += 1
            self._unmarked[item.id] = (item.lease_token, key)
            self._mark_soon()
            if lane.queue and not lane.ready:
                lane.ready = True
                self._ready.append(key)
        else:
            self._stop_lane(key)
        self._forget_if_idle(key)
        self._kick.set()

    def _stop_lane(self, key: LaneKey) -> None:
        """Give back the items of a lane leased here behind one that did not go."""
        lane = self._lanes[key]
        self._unsent.extend(lane.queue)
        self._held -= len(lane.queue)
        lane.queue.clear()
        lane.more = False
        if lane.ready:
            lane.ready = False
            self._ready.remove(key)
        self._kick.set()

    def _forget_if_idle(self, key: LaneKey) -> None:
        lane = self._lanes.get(key)
        if lane is not None and lane.idle:
            del self._lanes[key]

    # --- marking delivered items ------------------------------------------------------------

    def _mark_soon(self) -> None:
        if self._marker is None or self._marker.done():
            self._marker = asyncio.create_task(self._mark_in_background())

    async def _mark_in_background(self) -> None:
        try:
            await self._mark()
        except asyncio.CancelledError:
            raise
        except Exception:  # tried again by the loop; meanwhile the leases hold
            log.exception("could not mark %d delivered item(s) so; trying again",
                          len(self._unmarked))
            self._kick.set()

    async def _mark(self) -> None:
        """Mark the delivered items so, as many at a time as have piled up (up to a bound)."""
        while self._unmarked:
            batch = list(itertools.islice(self._unmarked.items(), CHUNK))
            marked = await self.stores.outbox.delivered_all(
                [(item_id, token) for item_id, (token, _) in batch], now_ms())
            for item_id, (_, key) in batch:
                del self._unmarked[item_id]
                if item_id not in marked:
                    log.warning("outbox %d was delivered, but its lease had run out and been"
                                " taken: it may be delivered again", item_id)
                lane = self._lanes.get(key)
                if lane is not None:
                    lane.unmarked -= 1
                    self._forget_if_idle(key)

    async def _deliver(self, item: OutboxItem) -> None:
        network = self.networks.get(item.network)
        attempt = item.attempts
        delivered = False
        try:
            assert self._webhook is not None and item.lease_until is not None
            outcome = await self._webhook.post(network, item, attempt)
            if now_ms() > item.lease_until:
                log.warning("the delivery of outbox %d to %s outlasted its lease: another"
                            " worker may deliver it again", item.id, item.network)
            if outcome.ok:
                delivered = True
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
            if self._running:
                self._finished(item, delivered=delivered)

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
        if not await self.stores.outbox.retry_later(item.id, attempt, next_at, outcome.error,
                                                     item.lease_token):
            log.warning("outbox %d is no longer held here; its retry is left to its holder",
                        item.id)
            return
        self.metrics.delivery(network.id, "retried")
        log.warning("delivery of outbox %d to %s failed (attempt %d: %s); next try in %.1f s",
                    item.id, network.id, attempt, outcome.error, (next_at - now) / 1000)

    async def _kill(self, item: OutboxItem, attempts: int, why: str) -> None:
        """Make the item a dead letter, and tell the platform (once it can be reached): the
        one place where an item becomes a dead letter (by its lease holder, when leased)."""
        if not await self.stores.outbox.kill(item.id, attempts, why, now_ms(), item.lease_token):
            return
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
        count = await self.stores.outbox.ack(network.id, ids, now_ms())
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
