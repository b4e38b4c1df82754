"""What recording a homeserver transaction leaves to do once it commits.

Each event is recorded with an :class:`Effects` of its own (:meth:`Effects.child`), kept only
once the event is: one whose changes are rolled back (its savepoint, or the whole attempt at
the transaction) leaves nothing behind, neither an outbox item handed to delivery nor a typing
flag remembered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from mautrix.util.async_db import Connection

from .db import Stores
from .db.dm import DMRecord
from .db.outbox import OutboxItem


class Handoff(Protocol):
    """This worker's deliverer, as the recording of a homeserver transaction sees it."""

    def lease(self, network: str, now: int) -> tuple[int, str] | None:
        """(until, token): how a new item for ``network`` is to be leased for delivery here if
        it is its lane's first; None if it is not to be (pulled, or delivery is busy). The
        lease counts as held until its item is taken, or it is said to be unused."""

    def unused(self, token: str) -> None:
        """A lease from :meth:`lease` that no item got (it was not its lane's first, or was
        queued before)."""

    def take(self, items: list[OutboxItem]) -> None:
        """Items just committed: the leased ones to deliver now, the others in their turn."""


@dataclass
class Effects:
    """What a transaction (or one of its events) leaves for after its commit."""

    handoff: Handoff | None = None
    # Networks with new items that the outbox is to look for (those not handed over).
    networks: set[str] = field(default_factory=set)
    # New items handed to this worker's deliverer, leased if first in their lane.
    handed: list[OutboxItem] = field(default_factory=list)
    invites: bool = False
    undelivered: bool = False  # the user is owed a notice about a message not delivered
    # Encrypted messages of users the bridge could not read: (ghost, room, event) to tell the
    # user about in the room.
    undecryptable: list[tuple[str, str, str]] = field(default_factory=list)
    # Encrypted messages of users now waiting for their room key.
    waiting: bool = False
    # Rooms whose user the platform is now told started (True) or stopped typing.
    typing: dict[str, bool] = field(default_factory=dict)
    parent: Effects | None = None

    def child(self) -> Effects:
        """The effects of one event, kept (:meth:`keep`) only if the event is."""
        return Effects(handoff=self.handoff, parent=self)

    def keep(self) -> None:
        """The event was recorded: its effects become its transaction's."""
        assert self.parent is not None
        self.parent.networks |= self.networks
        self.parent.handed += self.handed
        self.parent.invites = self.parent.invites or self.invites
        self.parent.undelivered = self.parent.undelivered or self.undelivered
        self.parent.undecryptable += self.undecryptable
        self.parent.waiting = self.parent.waiting or self.waiting
        self.parent.typing.update(self.typing)

    def typing_of(self, room_id: str) -> bool | None:
        """Whether this transaction (so far) told the platform the room's user typed."""
        if room_id in self.typing:
            return self.typing[room_id]
        return self.parent.typing_of(room_id) if self.parent is not None else None

    async def queue(self, stores: Stores, conn: Connection, dm: DMRecord,
                    payload: dict[str, Any], key: str, now: int) -> int | None:
        """Queue an item for the DM's platform; its id, or None if the key was queued before."""
        lease = self.handoff.lease(dm.network, now) if self.handoff is not None else None
        if lease is None:
            item_id = await stores.outbox.add(
                conn, network=dm.network, remote_id=dm.remote_id, user_id=dm.user_id,
                type=payload["type"], key=key, payload=payload, now=now,
            )
            if item_id is not None:
                self.networks.add(dm.network)
            return item_id
        item = await stores.outbox.add_leased(
            conn, network=dm.network, remote_id=dm.remote_id, user_id=dm.user_id,
            type=payload["type"], key=key, payload=payload, now=now, lease_until=lease[0],
            token=lease[1],
        )
        if (item is None or item.lease_token is None) and self.handoff is not None:
            self.handoff.unused(lease[1])
        if item is None:
            return None
        self.handed.append(item)
        return item.id
