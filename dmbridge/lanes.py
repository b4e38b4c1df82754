"""The lanes a worker delivers: a DM's outbox items go out one at a time, in id order.

A lane is held here while this worker has leased items of it (waiting their turn, or one being
delivered), or delivered items whose rows do not say so yet: meanwhile no other worker may take
its next items, and this one looks for them itself after each delivery.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .db.outbox import OutboxItem

LaneKey = tuple[str, str, str]
"""A lane: network, remote_id, user_id."""


def lane_key(item: OutboxItem) -> LaneKey:
    return item.network, item.remote_id, item.user_id


@dataclass
class Lane:
    """A lane held here."""

    # Leased here and waiting their turn, in id order.
    queue: deque[OutboxItem] = field(default_factory=deque)
    busy: bool = False  # one of its items is being delivered
    ready: bool = False  # waiting for a free delivery slot
    done: int = 0  # its last item delivered here (whether or not its row says so yet)
    unmarked: int = 0  # its items delivered here whose rows do not say so yet
    more: bool = False  # items may wait unleased behind those held: look for them
    looking: bool = False  # its next items are being looked for

    @property
    def idle(self) -> bool:
        return not (self.queue or self.busy or self.unmarked or self.more or self.looking)

    @property
    def wants_next(self) -> bool:
        """Its next items are to be looked for now."""
        return self.more and not self.busy and not self.queue
