"""What the homeserver tells the bridge: transactions of events, and questions about ghosts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mautrix.appservice import AppService
from mautrix.errors import MatrixRequestError
from mautrix.types import Event, EventID, SerializerError
from mautrix.util.async_db import Connection

from . import jsontext
from .db import Stores, now_ms
from .effects import Effects, Handoff
from .ghosts import Ghosts
from .lifecycle import Lifecycle
from .metrics import Metrics
from .networks import Networks

log = logging.getLogger("dmbridge.matrix")

MAX_ID_BYTES = 255  # the spec's limit for event, room and user IDs (and member state keys)


class _EventFailed(Exception):
    """Applying one event of a transaction failed (the cause is chained)."""

    def __init__(self, event_id: str) -> None:
        super().__init__(event_id)
        self.event_id = event_id


class MatrixHandler:
    def __init__(
        self, *, stores: Stores, networks: Networks, appservice: AppService, ghosts: Ghosts,
        on_leave: str, metrics: Metrics | None = None, encryption: str = "off",
        handoff: Handoff | None = None,
    ) -> None:
        self.stores = stores
        self.metrics = metrics if metrics is not None else Metrics()
        self.networks = networks
        self.appservice = appservice
        self.ghosts = ghosts
        self.on_leave = on_leave
        self.lifecycle = Lifecycle(
            stores=stores, networks=networks, bot_user_id=appservice.bot_mxid, on_leave=on_leave,
            encryption=encryption,
        )
        # This worker's deliverer, handed the new outbox items it may deliver at once.
        self.handoff = handoff
        # Told after each commit: which networks have other new outbox items, and of new
        # invites.
        self.on_queued: Callable[[set[str]], None] = lambda networks: None
        self.on_invited: Callable[[], None] = lambda: None
        self.on_undelivered: Callable[[], None] = lambda: None
        # Told of the users' encrypted messages that could not be read: (ghost, room, event).
        self.on_undecryptable: Callable[[list[tuple[str, str, str]]], None] = lambda items: None
        # Told when encrypted messages of users start waiting for their room key.
        self.on_waiting: Callable[[], None] = lambda: None

    async def handle_transaction(self, txn_id: str, events: list[Any],
                                 ephemeral: list[Any] | None = None, *, untrusted: bool = True
                                 ) -> None:
        """Record the events durably; returns only once they are committed.

        Events already processed (a resent transaction, whatever its ID) change nothing. An
        event the bridge cannot store (see :func:`unstorable`) is logged and skipped, so it
        never holds up the events behind it. ``untrusted=False`` says the transaction's text
        holds no NUL, no lone surrogate and nothing cut out for its depth (the usual case), so
        the events need no scrubbing. Raises on a database failure, so the homeserver sends
        the transaction again.

        The events are recorded in one database transaction. Should one of them fail, that
        attempt is rolled back and the events recorded again, each in a savepoint of its own,
        so that the failing one is skipped and the others kept: savepoints cost statements, so
        they are paid for only once an event has failed.
        """
        try:
            record = await self._record(txn_id, events, ephemeral, untrusted, isolated=False)
        except _EventFailed as e:
            log.debug("txn %s: event %s failed (%r); recording each event on its own", txn_id,
                      e.event_id, e.__cause__)
            record = await self._record(txn_id, events, ephemeral, untrusted, isolated=True)
        fresh, effects, outcomes = record
        for event_type, outcome in outcomes:
            self.metrics.event(event_type, outcome)
        self._committed(effects)
        for raw in fresh:
            if "state_key" in raw:  # the cache holds room state only; messages pass it by
                await self._update_state_store(raw)
        if events:
            log.debug("txn %s: %d events, %d new", txn_id, len(events), len(fresh))

    async def _record(self, txn_id: str, events: list[Any], ephemeral: list[Any] | None,
                      untrusted: bool, *, isolated: bool
                      ) -> tuple[list[dict[str, Any]], Effects, list[tuple[object, str]]]:
        """One attempt at recording the transaction: the new events, what they leave for
        after the commit, and each event's outcome (counted once committed).

        Not ``isolated``, an event that fails raises :class:`_EventFailed` (and nothing is
        recorded); ``isolated``, each event is applied in a savepoint of its own, and one that
        fails is logged and skipped.
        """
        fresh: list[dict[str, Any]] = []
        at = now_ms()
        conn: Connection
        effects = Effects(handoff=self.handoff)
        outcomes: list[tuple[object, str]] = []
        # Typing and receipts only: they read before they write.
        async with self.stores.transaction(write_first=not events) as conn:
            for raw in events:
                if (problem := unstorable(raw, untrusted)) is not None:
                    log.warning("txn %s: skipping an event the bridge cannot store (%s): %.300r",
                                txn_id, problem, raw)
                    outcomes.append((raw.get("type") if isinstance(raw, dict) else None,
                                     "skipped"))
                    continue
                if untrusted:
                    raw = jsontext.scrub(raw)
                event_id = raw["event_id"]
                if not await self.stores.events.claim(conn, EventID(event_id), at):
                    log.debug("txn %s: %s already processed", txn_id, event_id)
                    outcomes.append((raw.get("type"), "duplicate"))
                    continue
                fresh.append(raw)
                outcomes.append((raw.get("type"),
                                 await self._apply(conn, txn_id, raw, at, effects, isolated)))
            for edu in ephemeral or []:
                if isinstance(edu, dict) and isinstance(edu.get("room_id"), str) and isinstance(
                    edu.get("content"), dict
                ) and not (untrusted and jsontext.holds_cut(edu)):
                    edu = jsontext.scrub(edu) if untrusted else edu
                    await self._apply(conn, txn_id, edu, at, effects, isolated, ephemeral=True)
        return fresh, effects, outcomes

    def _committed(self, effects: Effects) -> None:
        """What a committed transaction left to do: typing told, items handed to delivery,
        the outbox, invites, notices and messages waiting for keys woken."""
        self.lifecycle.committed(effects)
        if effects.handed and self.handoff is not None:
            self.handoff.take(effects.handed)
        if effects.networks:
            self.on_queued(effects.networks)
        if effects.invites:
            self.on_invited()
        if effects.undelivered:
            self.on_undelivered()
        if effects.undecryptable:
            self.on_undecryptable(effects.undecryptable)
        if effects.waiting:
            self.on_waiting()

    async def handle_late(self, decrypted: list[tuple[str, Any]], expired: list[dict[str, Any]]
                          ) -> None:
        """Messages that waited for their room key: ``decrypted`` (the waiting event's ID and
        the event decrypted, with any value nested too deep cut out) are applied as they
        would have been on arrival, ``expired`` ones told as undecryptable. Each once: one no
        longer waiting (done meanwhile) is left alone. Raises on a database failure."""
        at = now_ms()
        effects = Effects(handoff=self.handoff)
        outcomes: list[tuple[object, str]] = []
        conn: Connection
        async with self.stores.transaction() as conn:
            for event_id, raw in decrypted:
                if not await self.stores.undecrypted.take(conn, event_id):
                    continue
                if (problem := unstorable(raw)) is not None:
                    log.warning("late key: skipping an event the bridge cannot store (%s): %.300r",
                                problem, raw)
                    outcomes.append((raw.get("type") if isinstance(raw, dict) else None,
                                     "skipped"))
                    continue
                raw = jsontext.scrub(raw)
                outcomes.append((raw.get("type"),
                                 await self._apply(conn, "late-key", raw, at, effects,
                                                   isolated=True)))
            for raw in expired:
                if await self.stores.undecrypted.take(conn, str(raw["event_id"])):
                    await self.lifecycle.undecryptable(conn, raw, at, effects, waited=True)
        for event_type, outcome in outcomes:
            self.metrics.event(event_type, outcome)
        self._committed(effects)

    async def _apply(self, conn: Connection, txn_id: str, raw: dict[str, Any], at: int,
                     effects: Effects, isolated: bool, ephemeral: bool = False) -> str:
        """Apply one event, its effects kept only with it. Returns what became of it:
        ``processed``, ``skipped`` (malformed) or, ``isolated`` in a savepoint, ``failed``
        (logged and skipped); not ``isolated``, a failure raises :class:`_EventFailed`.

        If even the rollback to the savepoint fails, the database itself is in trouble: the
        error goes up and the homeserver resends the whole transaction.
        """
        own = effects.child()
        if not isolated:
            try:
                outcome = await self._apply_one(conn, txn_id, raw, at, own, ephemeral)
            except Exception as e:
                raise _EventFailed(str(raw.get("event_id"))) from e
            own.keep()
            return outcome
        await conn.execute("SAVEPOINT dmbridge_event")
        try:
            outcome = await self._apply_one(conn, txn_id, raw, at, own, ephemeral)
        except Exception:
            await conn.execute("ROLLBACK TO SAVEPOINT dmbridge_event")
            log.exception("txn %s: could not handle event %s (%s in %s); skipped", txn_id,
                          raw.get("event_id"), raw.get("type"), raw.get("room_id"))
            outcome = "failed"
        else:
            own.keep()
        await conn.execute("RELEASE SAVEPOINT dmbridge_event")
        return outcome

    async def _apply_one(self, conn: Connection, txn_id: str, raw: dict[str, Any], at: int,
                         effects: Effects, ephemeral: bool) -> str:
        if ephemeral:
            await self.lifecycle.apply_ephemeral(conn, raw, at, effects)
        elif _well_formed(raw):
            await self.lifecycle.apply(conn, raw, at, effects)
        else:
            log.warning("txn %s: event %s is malformed; skipped", txn_id, raw.get("event_id"))
            return "skipped"
        return "processed"

    async def _update_state_store(self, raw: dict[str, Any]) -> None:
        """Keep mautrix's state store (a cache for its intents) in step with ours.

        Runs after our commit, so a failure here is logged, not turned into a resend.
        """
        try:
            event = Event.deserialize(raw)
        except (SerializerError, ValueError, TypeError, AttributeError, KeyError):
            log.warning("could not parse event %s of type %s", raw.get("event_id"), raw.get("type"))
            return
        try:
            await self.appservice.state_store.update_state(event)
        except Exception:
            log.exception("could not update the state cache with %s", raw.get("event_id"))

    async def query_user(self, user_id: str) -> bool:
        """Does this ghost exist? Registers it first, as the spec asks, when it is valid."""
        if user_id == self.appservice.bot_mxid:
            return True
        parsed = self.networks.parse_ghost(user_id)
        if parsed is None:
            log.info("user query for %s: not a ghost of any configured network", user_id)
            return False
        network, remote_id = parsed
        try:
            await self.ghosts.ensure_registered(network, remote_id)
        except MatrixRequestError as e:
            log.error("user query for %s: registering failed: %s", user_id, e)
            raise
        return True


def _well_formed(raw: dict[str, Any]) -> bool:
    if not isinstance(raw.get("room_id"), str) or not isinstance(raw.get("content"), dict):
        return False
    return raw.get("type") != "m.room.member" or isinstance(raw.get("state_key"), str)


def unstorable(raw: object, maybe_cut: bool = True) -> str | None:
    """Why an event from the homeserver cannot be recorded as it is, or None.

    IDs are stored and looked up exactly, so bad ones are not repaired: such an event (and one
    with a value nested too deep, see :mod:`dmbridge.jsontext`) is skipped. Other text with NUL
    or lone surrogates is repaired by :func:`jsontext.scrub`.
    """
    if not isinstance(raw, dict):
        return "not an object"
    # A member event's state key is a user ID the bridge stores; other state keys it does not.
    keys = ("event_id", "room_id", "sender") + (
        ("state_key",) if raw.get("type") == "m.room.member" else ())
    for key in keys:
        value = raw.get(key)
        if value is None and key != "event_id":
            continue
        if not isinstance(value, str) or not value:
            return f"{key} is not a non-empty string"
        if jsontext.storable_text(value) != value:
            return f"{key} holds NUL or a lone surrogate"
        if len(value.encode()) > MAX_ID_BYTES:
            return f"{key} is longer than {MAX_ID_BYTES} bytes"
    if maybe_cut and jsontext.holds_cut(raw):
        return "nested too deep"
    return None
