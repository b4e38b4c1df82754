"""Webhook deliveries: a DM's outbox items pushed to its platform one at a time, in order.

An item reaches this worker's deliverer in one of three ways: handed over by the recording of a
homeserver transaction as soon as it commits, already leased if it was the first of its lane
(:meth:`Deliverer.take`); as the next items of a lane just delivered here, leased several at a
time (:mod:`.lanes`); or found by a look at the database (another worker's items, retries come
due, the API's notices). Delivered items are marked so in batches; until then their leases keep
other workers out of their lanes. Every change to a leased row names the lease's token, so that
only its holder makes it. What this worker holds is bounded (``delivery.concurrency`` times
:data:`HELD_PER_SLOT` items): past that, new replies wait in the database.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import aiohttp
from mautrix.util.async_db import Connection

from . import wake
from .config import DeliverySettings
from .db import Stores, now_ms
from .db.outbox import CHUNK, OutboxItem
from .lanes import Lane, LaneKey, lane_key
from .metrics import Metrics
from .networks import Network, Networks
from .notices import AdminNotices
from .undelivered import Undelivered
from .webhook import Outcome, Present, WebhookClient

log = logging.getLogger("dmbridge.outbox")

POLL_S = 1.0  # how often the database is checked for work other workers (or the CLI) queued
LEASE_SLACK_S = 5.0  # a lease lasts the delivery timeout and this much more
LANE_BATCH = 16  # items of one lane leased at a time, to go out one after the other
HELD_PER_SLOT = 2 * LANE_BATCH  # leased items held here per delivery slot, at most
MARK_RETRY_S = (0.5, 10.0)  # seconds before a failed delivered-mark is tried again: doubling
MARK_LOG_S = 60.0  # while marks keep failing, one log line per this long

DeadLetter = Callable[[OutboxItem, int, str], Awaitable[None]]
"""Makes an item a dead letter: (item, attempts, why)."""
T = TypeVar("T")


async def finish(work: Awaitable[T]) -> tuple[T, bool]:
    """Run ``work`` to its end even if the caller is cancelled meanwhile: its result, and
    whether the caller was (it is then to keep what the work leased, and stop)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task), False
    except asyncio.CancelledError:
        if not task.done():
            await asyncio.wait([task])
        if task.cancelled() or task.exception() is not None:
            raise  # the cancellation, never swallowed
        return task.result(), True


def backoff(attempt: int, settings: DeliverySettings, rng: random.Random | None = None) -> float:
    """Seconds before retry ``attempt`` + 1: doubling from initial_backoff, capped, jittered.

    The jitter takes the wait from half to all of the nominal delay ("equal jitter"), so
    receivers coming back are not hit by every bridge at once, and waits still grow.
    """
    nominal = min(settings.max_backoff, settings.initial_backoff * 2 ** max(0, attempt - 1))
    return (rng or random).uniform(nominal / 2, nominal)


class Deliverer:
    """This worker's webhook deliveries (see the module's description)."""

    def __init__(self, *, stores: Stores, networks: Networks, push: list[str],
                 settings: DeliverySettings, present: Present, notices: AdminNotices,
                 metrics: Metrics, dead_letter: DeadLetter,
                 announce: Callable[[set[str]], None], undelivered: Undelivered) -> None:
        self.stores = stores
        self.networks = networks
        self.settings = settings
        self.notices = notices
        self.metrics = metrics
        self._present = present
        self._push = push
        self._dead_letter = dead_letter
        # Told of deliveries of the user's messages that it said had failed.
        self.undelivered = undelivered
        # Tells the other workers on the same database (see :mod:`dmbridge.peers`).
        self._announce = announce
        self._lease_ms = int((settings.timeout + LEASE_SLACK_S) * 1000)
        # A lease must have this much left when its POST starts (else it is renewed first):
        # the POST's longest, and half the slack left after it for the delivered mark to land
        # before another worker may take the item (and send it again, after its successor).
        self._needed_ms = int((settings.timeout + LEASE_SLACK_S / 2) * 1000)
        self._held_max = settings.concurrency * HELD_PER_SLOT
        self._kick = asyncio.Event()  # the delivery loop has something to do
        self._look = True  # the database is to be searched for due items
        self._look_at = 0.0  # when it is next worth searching anyway (monotonic)
        self._lanes: dict[LaneKey, Lane] = {}
        self._ready: deque[LaneKey] = deque()  # lanes whose next item waits for a free slot
        self._held = 0  # items leased here, waiting or being delivered
        # Leases handed to the recording of homeserver transactions, counted as held until
        # their items are taken (or are said to be unused, or their leases would have run out:
        # the transaction failed): token -> lease end.
        self._reserved: dict[str, int] = {}
        self._in_flight: dict[int, tuple[OutboxItem, asyncio.Task[None]]] = {}
        # Delivered, not marked so yet: id -> (token, lane, the item if its delivery may
        # correct a notice that said it failed).
        self._unmarked: dict[int, tuple[str, LaneKey, OutboxItem | None]] = {}
        self._marker: asyncio.Task[None] | None = None
        self._mark_failures = 0  # marks failed in a row (the marker retries them, resting)
        self._unsent: list[OutboxItem] = []  # leased, never sent: given back
        self._running = False
        self._stopped = False  # what is handed over now is given back at once
        self._late: set[asyncio.Task[None]] = set()  # such give-backs
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._webhook: WebhookClient | None = None
        self._owner = secrets.token_hex(8)
        self._leases = itertools.count(1)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._webhook = WebhookClient(self._session, self.settings.timeout, self._present)
        self._running, self._look, self._stopped = True, True, False
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._running = False
        # Snapshot first: a delivery ending meanwhile leaves _in_flight (if it was delivered,
        # for _unmarked, and then it is not given back).
        in_flight = [item for item, _ in self._in_flight.values()]
        tasks = [task for _, task in self._in_flight.values()]
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, task in self._in_flight.values():
            if task not in tasks:  # started by the delivery loop as it stopped
                tasks.append(task)
        in_flight += [item for item, _ in self._in_flight.values() if item not in in_flight]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._marker is not None:
            if self._mark_failures:  # resting between failed marks: tried once more below
                self._marker.cancel()
            await asyncio.gather(self._marker, return_exceptions=True)
        waiting = [*self._unsent, *(item for lane in self._lanes.values() for item in lane.queue)]
        self._stopped = True
        self._lanes.clear()
        self._ready.clear()
        self._unsent, self._held = [], 0
        self._reserved.clear()
        try:
            await self._mark()
        except Exception as e:  # their leases run out, and they are delivered again
            log.warning("could not mark %d delivered item(s) so: %r", len(self._unmarked), e)
        in_flight = [item for item in in_flight if item.id not in self._unmarked]
        await self._give_back(in_flight, uncount=False)
        await self._give_back(waiting)
        if self._late:
            await asyncio.gather(*self._late, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def wake(self, networks: set[str]) -> None:
        """New items were committed for these (webhook) networks, by anyone."""
        self._look = True
        for key, lane in self._lanes.items():  # they may be behind an item held here
            if key[0] in networks:
                lane.more = True
        self._kick.set()

    # --- handed over by the recording of homeserver transactions (see effects.Handoff) -----

    def lease(self, network: str, now: int) -> tuple[int, str] | None:
        if not self._running or network not in self._push:
            return None
        if self._holding(now) >= self._held_max:
            return None
        until, token = now + self._lease_ms, self._token()
        self._reserved[token] = until
        return until, token

    def unused(self, token: str) -> None:
        self._reserved.pop(token, None)

    def _holding(self, now: int) -> int:
        """Items leased here, and leases handed out for items not taken yet."""
        while self._reserved:  # in the order given: the oldest first
            token, until = next(iter(self._reserved.items()))
            if until >= now:
                break
            del self._reserved[token]
        return self._held + len(self._reserved)

    async def _give_back(self, items: list[OutboxItem], *, uncount: bool = True) -> None:
        try:
            await self.stores.outbox.give_back(items, uncount=uncount)
        except Exception as e:  # the leases then simply run out
            log.warning("could not release %d delivery lease(s): %r", len(items), e)

    def take(self, items: list[OutboxItem]) -> None:
        if not self._running:  # stopping: their leases are given back (or else run out)
            leased = [item for item in items if item.lease_token is not None]
            if not self._stopped:
                self._unsent.extend(leased)
            elif leased:  # the stop gave back what it had already
                task = asyncio.create_task(self._give_back(leased))
                self._late.add(task)
                task.add_done_callback(self._late.discard)
            return
        others: set[str] = set()
        for item in items:
            if item.lease_token is not None:
                self._reserved.pop(item.lease_token, None)
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
        while True:
            try:
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
            self._mark_soon()
        if self._look or time.monotonic() >= self._look_at:
            await self._search()
        for key in [key for key, lane in self._lanes.items() if lane.wants_next]:
            if self._holding(now_ms()) >= self._held_max:
                break
            await self._next_in_lane(key)
        await self._start()

    async def _search(self) -> None:
        """Lease the due heads of lanes not held here, as many as there is room for."""
        free = min(self.settings.concurrency - len(self._in_flight) - len(self._ready),
                   self._held_max - self._holding(now_ms()))
        if free <= 0:
            # Searched once a slot frees up (self._look stays, and _finished wakes the loop);
            # until then the loop rests rather than come straight back here.
            self._look_at = time.monotonic() + POLL_S
            return
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
            leased, cancelled = await finish(self.stores.outbox.lease(item.id, now, until,
                                                                      token))
            if leased:
                self._hold(replace(item, attempts=item.attempts + 1, lease_until=until,
                                   lease_token=token), more=True)
                free -= 1
            if cancelled:
                raise asyncio.CancelledError
        next_due = await self.stores.outbox.next_due_at(self._push)
        wait = POLL_S if next_due is None else min(POLL_S, max(0.01, (next_due - now) / 1000))
        self._look_at = time.monotonic() + wait

    async def _next_in_lane(self, key: LaneKey) -> None:
        """Lease the next items of a lane held here, after those delivered here."""
        lane = self._lanes[key]
        lane.more = False  # set again if told of more meanwhile
        lane.looking = True  # kept meanwhile
        now = now_ms()
        limit = min(LANE_BATCH, self._held_max - self._holding(now))
        try:
            items, cancelled = await finish(self.stores.outbox.lease_next(
                key, lane.done, now, now + self._lease_ms, self._token(), limit))
        finally:
            lane.looking = False
        for item in items:
            self._hold(item)
        if cancelled:
            raise asyncio.CancelledError
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
                try:
                    renewed = await self.stores.outbox.renew(item.id, item.lease_token, until)
                except BaseException:  # still held here: tried again, or given back by a stop
                    lane.queue.appendleft(item)
                    lane.busy, lane.ready = False, True
                    self._ready.appendleft(key)
                    raise
                if not renewed:
                    log.warning("outbox %d is no longer held here (its lease ran out); its"
                                " lane is left to whoever holds it", item.id)
                    lane.busy = False
                    self._held -= 1
                    self._stop_lane(key)
                    self._forget_if_idle(key)
                    continue
                item = replace(item, lease_until=until)
            self._in_flight[item.id] = (item, asyncio.create_task(self._deliver(item)))

    def _finished(self, item: OutboxItem, *, delivered: bool) -> OutboxItem | None:
        """An item leased here is no longer: delivered, or failed (its lane then waits for
        its retry, found by a search, or for its death). Returns the lane's next item if it
        is to go at once in the same slot: no other lane waits for one, and its lease is fresh
        enough for its POST."""
        key = lane_key(item)
        lane = self._lanes.setdefault(key, Lane())
        lane.busy = False
        self._held -= 1
        self._kick.set()
        if not delivered:
            self._stop_lane(key)
            self._forget_if_idle(key)
            return None
        assert item.lease_token is not None
        lane.done = max(lane.done, item.id)
        lane.unmarked += 1
        self._unmarked[item.id] = (item.lease_token, key,
                                   item if Undelivered.may_correct(item) else None)
        self._mark_soon()
        if not lane.queue:
            self._forget_if_idle(key)
            return None
        head = lane.queue[0]
        assert head.lease_until is not None
        if not self._ready and head.lease_until - now_ms() >= self._needed_ms:
            lane.busy = True
            return lane.queue.popleft()
        if not lane.ready:
            lane.ready = True
            self._ready.append(key)
        return None

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
        """Mark what was delivered; while that fails (the database is down, say), try again
        after a rest that doubles, logging once a while. Meanwhile the leases hold."""
        logged_at = 0.0
        while True:
            try:
                await self._mark()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._mark_failures += 1
                if self._mark_failures == 1:
                    log.exception("could not mark %d delivered item(s) so; trying again",
                                  len(self._unmarked))
                    logged_at = time.monotonic()
                elif time.monotonic() - logged_at >= MARK_LOG_S:
                    log.warning("still cannot mark %d delivered item(s) so (%d tries): %r",
                                len(self._unmarked), self._mark_failures, e)
                    logged_at = time.monotonic()
                first, most = MARK_RETRY_S
                await asyncio.sleep(min(most, first * 2 ** (self._mark_failures - 1)))
                continue
            if self._mark_failures:
                log.info("delivered items marked so again, after %d failed tries",
                         self._mark_failures)
                self._mark_failures = 0
            return

    async def _mark(self) -> None:
        """Mark the delivered items so, as many at a time as have piled up (up to a bound)."""
        while self._unmarked:
            batch = list(itertools.islice(self._unmarked.items(), CHUNK))
            marked = await self.delivered(
                [(item_id, token) for item_id, (token, _, _) in batch],
                [item for _, (_, _, item) in batch if item is not None])
            for item_id, (_, key, _) in batch:
                del self._unmarked[item_id]
                if item_id not in marked:
                    log.warning("outbox %d was delivered, but its lease had run out and been"
                                " taken: it may be delivered again", item_id)
                lane = self._lanes.get(key)
                if lane is not None:
                    lane.unmarked -= 1
                    self._forget_if_idle(key)

    async def delivered(self, held: list[tuple[int, str]], correcting: list[OutboxItem]
                        ) -> set[int]:
        """Mark delivered the items (id, lease token) still held here; the ids marked. Those
        of ``correcting`` whose notice said they failed have it corrected in the same
        transaction, so that no crash leaves the user told they failed."""
        if not correcting:
            return await self.stores.outbox.delivered_all(held, now_ms())
        corrected = False
        conn: Connection
        async with self.stores.db.acquire() as conn, conn.transaction():
            marked = await self.stores.outbox.delivered_all(held, now_ms(), conn)
            for item in correcting:
                if item.id in marked and await self.undelivered.delivered(conn, item):
                    corrected = True
        if corrected:
            self.undelivered.wake()
        return marked

    async def _deliver(self, first: OutboxItem) -> None:
        """Deliver an item, then the next items of its lane that go in the same slot."""
        task = asyncio.current_task()
        assert task is not None
        item: OutboxItem | None = first
        while item is not None:
            item = await self._deliver_one(item, task)

    async def _deliver_one(self, item: OutboxItem, task: asyncio.Task[None]
                           ) -> OutboxItem | None:
        network = self.networks.get(item.network)
        attempt = item.attempts
        delivered = False
        after: OutboxItem | None = None
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
                after = self._finished(item, delivered=delivered)
                if after is not None:
                    self._in_flight[after.id] = (after, task)
            elif delivered:  # stopping: marked so by the stop
                assert item.lease_token is not None
                self._unmarked[item.id] = (item.lease_token, lane_key(item),
                                           item if Undelivered.may_correct(item) else None)
        return after

    async def _failed(self, network: Network, item: OutboxItem, attempt: int,
                      outcome: Outcome) -> None:
        self.notices.delivery_failed(network.id, outcome.error)
        now = now_ms()
        deadline = item.queued_at + int(self.settings.max_age * 1000)
        if attempt >= self.settings.max_attempts or now >= deadline:
            why = f"gave up after {attempt} attempt(s); last: {outcome.error}"
            await self._dead_letter(item, attempt, why)
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
