"""Handlers by event type, and running them once per event however often it arrives."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .events import (
    NOTICE_TYPES,
    Deletion,
    DeliveryFailed,
    DirectMessage,
    Edit,
    Event,
    Notice,
    Reaction,
    ReadReceipt,
    Typing,
)

log = logging.getLogger("dmbridge_client")

E = TypeVar("E", bound=Event)
Handler = Callable[[E], Awaitable[object]]
AnyHandler = Callable[[Any], Awaitable[object]]


class Handlers:
    """The decorators a client offers: ``@client.on_direct_message`` and the others.

    Several handlers may be given for one type; they run in the order they were registered.
    An event of a type without handlers is acknowledged and dropped.
    """

    def __init__(self) -> None:
        self._by_type: dict[str, list[AnyHandler]] = {}
        self._any: list[AnyHandler] = []

    def _add(self, types: tuple[str, ...], handler: AnyHandler) -> None:
        for kind in types:
            self._by_type.setdefault(kind, []).append(handler)

    def on_direct_message(self, handler: Handler[DirectMessage]) -> Handler[DirectMessage]:
        """What the Matrix user writes (``message`` events); ``message.reply(...)`` answers."""
        self._add(("message",), handler)
        return handler

    def on_edit(self, handler: Handler[Edit]) -> Handler[Edit]:
        self._add(("edit",), handler)
        return handler

    def on_reaction(self, handler: Handler[Reaction]) -> Handler[Reaction]:
        self._add(("reaction",), handler)
        return handler

    def on_deletion(self, handler: Handler[Deletion]) -> Handler[Deletion]:
        self._add(("redaction",), handler)
        return handler

    def on_typing(self, handler: Handler[Typing]) -> Handler[Typing]:
        self._add(("typing",), handler)
        return handler

    def on_read(self, handler: Handler[ReadReceipt]) -> Handler[ReadReceipt]:
        self._add(("read",), handler)
        return handler

    def on_notice(self, *types: str) -> Callable[[Handler[Notice]], Handler[Notice]]:
        """DM notices of the given types (``"dm.declined"``, ...); every one without types."""
        unknown = set(types) - set(NOTICE_TYPES)
        if unknown:
            raise ValueError(f"not DM notice types: {sorted(unknown)}; "
                             f"the types are {', '.join(NOTICE_TYPES)}")

        def register(handler: Handler[Notice]) -> Handler[Notice]:
            self._add(types or NOTICE_TYPES, handler)
            return handler
        return register

    def on_dm_started(self, handler: Handler[Notice]) -> Handler[Notice]:
        return self.on_notice("dm.started")(handler)

    def on_dm_user_left(self, handler: Handler[Notice]) -> Handler[Notice]:
        return self.on_notice("dm.user_left")(handler)

    def on_dm_declined(self, handler: Handler[Notice]) -> Handler[Notice]:
        return self.on_notice("dm.declined")(handler)

    def on_dm_ended(self, handler: Handler[Notice]) -> Handler[Notice]:
        return self.on_notice("dm.ended")(handler)

    def on_dm_cleared(self, handler: Handler[Notice]) -> Handler[Notice]:
        return self.on_notice("dm.cleared")(handler)

    def on_dm_forgotten(self, handler: Handler[Notice]) -> Handler[Notice]:
        return self.on_notice("dm.forgotten")(handler)

    def on_delivery_failed(self, handler: Handler[DeliveryFailed]) -> Handler[DeliveryFailed]:
        self._add(("delivery.failed",), handler)
        return handler

    def on_event(self, handler: Handler[Event]) -> Handler[Event]:
        """Every event, after the handlers of its type (types this client does not know too)."""
        self._any.append(handler)
        return handler

    def handlers_for(self, kind: str) -> list[AnyHandler]:
        return [*self._by_type.get(kind, ()), *self._any]


class Once:
    """Runs the handlers of an event once per ``idempotency_key``.

    A repeat that arrives while the first is being handled waits for it and shares its result;
    one that arrives after it succeeded is dropped. The ``remember`` most recent keys are kept.
    """

    def __init__(self, remember: int = 10_000) -> None:
        self.remember = remember
        self._done: OrderedDict[str, None] = OrderedDict()
        self._running: dict[str, asyncio.Task[None]] = {}

    def seen(self, key: str) -> bool:
        return key in self._done

    async def run(self, key: str, work: Callable[[], Awaitable[None]]) -> bool:
        """True if ``work`` ran for this call, False for a repeat. Raises what ``work`` raised."""
        if key in self._done:
            return False
        task = self._running.get(key)
        if task is not None:
            await asyncio.shield(task)
            return False

        async def wrapped() -> None:
            await work()

        task = asyncio.ensure_future(wrapped())
        self._running[key] = task
        task.add_done_callback(lambda t: self._finished(key, t))
        await asyncio.shield(task)  # a cancelled caller does not cut the handler short
        return True

    def _finished(self, key: str, task: asyncio.Task[None]) -> None:
        self._running.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        self._done[key] = None
        while len(self._done) > self.remember:
            self._done.popitem(last=False)
