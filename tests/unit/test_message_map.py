"""The message map's writes: answered only once committed, many in flight sharing statements."""

from __future__ import annotations

import asyncio
import logging

from mautrix.types import EventID, RoomID

from dmbridge.db import Stores, create_database
from dmbridge.db.message import SentMessage
from dmbridge.db.timing import time_queries


def sent(n: int) -> SentMessage:
    return SentMessage(RoomID("!room"), EventID(f"$event{n}"))


async def test_mappings_put_at_once_are_committed_when_answered(stores: Stores) -> None:
    statements: list[str] = []
    time_queries(stores.db, lambda kind, _: statements.append(kind))
    answers = await asyncio.gather(*(
        stores.messages.put("sms", "+1", f"m{n}", sent(n), 0) for n in range(8)))
    assert answers == [sent(n) for n in range(8)]
    assert len(statements) < 8  # written together, not one statement each
    # Another connection to the database sees every one of them: committed.
    other = create_database(str(stores.db.url), db_args={}, log=logging.getLogger("t"))
    await other.start()
    try:
        rows = await other.fetch("SELECT message_id, event_id FROM sent_message"
                                 " ORDER BY message_id")
    finally:
        await other.stop()
    assert [(r["message_id"], r["event_id"]) for r in rows] == [
        (f"m{n}", f"$event{n}") for n in range(8)]


async def test_the_same_message_put_twice_at_once_keeps_the_first(stores: Stores) -> None:
    first, second = await asyncio.gather(
        stores.messages.put("sms", "+1", "m", sent(1), 0),
        stores.messages.put("sms", "+1", "m", sent(2), 0))
    assert first == second == sent(1)
    assert await stores.messages.get("sms", "+1", "m") == sent(1)


async def test_a_mapping_already_there_is_answered_as_stored(stores: Stores) -> None:
    await stores.messages.put("sms", "+1", "m", sent(1), 0)
    assert await stores.messages.put("sms", "+1", "m", sent(2), 0) == sent(1)
