"""The message map's writes: answered only once committed, many in flight sharing statements."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mautrix.types import EventID, RoomID

from dmbridge.db import Stores, create_database
from dmbridge.db.message import MappingNotWritten, SentMessage
from dmbridge.db.timing import time_queries


def sent(n: int) -> SentMessage:
    return SentMessage(RoomID("!room"), EventID(f"$event{n}"))


async def test_mappings_put_at_once_are_committed_when_answered(stores: Stores) -> None:
    statements: list[str] = []
    time_queries(stores.db, lambda kind, _: statements.append(kind))
    # Another connection to the database (another process, on SQLite) reads each mapping right
    # after its put is answered: committed by then.
    other = create_database(str(stores.db.url), db_args={}, log=logging.getLogger("t"))
    await other.start()

    async def put_and_look(n: int) -> tuple[SentMessage, str | None]:
        answer = await stores.messages.put("sms", "+1", f"m{n}", sent(n), 0)
        seen = await other.fetchval(
            "SELECT event_id FROM sent_message WHERE network=$1 AND remote_id=$2"
            " AND message_id=$3", "sms", "+1", f"m{n}")
        return answer, seen

    try:
        answers = await asyncio.gather(*(put_and_look(n) for n in range(8)))
    finally:
        await other.stop()
    assert answers == [(sent(n), f"$event{n}") for n in range(8)]
    assert statements.count("fetch") < 8  # written together, not one statement each


async def test_the_same_message_put_twice_at_once_keeps_the_first(stores: Stores) -> None:
    first, second = await asyncio.gather(
        stores.messages.put("sms", "+1", "m", sent(1), 0),
        stores.messages.put("sms", "+1", "m", sent(2), 0))
    assert first == second == sent(1)
    assert await stores.messages.get("sms", "+1", "m") == sent(1)


async def test_a_mapping_already_there_is_answered_as_stored(stores: Stores) -> None:
    await stores.messages.put("sms", "+1", "m", sent(1), 0)
    assert await stores.messages.put("sms", "+1", "m", sent(2), 0) == sent(1)


async def test_a_bad_row_fails_only_its_own_put(stores: Stores) -> None:
    """Two of six mappings cannot be stored (no room): the four others are answered and
    committed, and each bad put gets an error of its own."""
    bad = {1, 4}
    answers = await asyncio.gather(*(
        stores.messages.put("sms", "+1", f"m{n}",
                            SentMessage(None, EventID(f"$event{n}"))  # type: ignore[arg-type]
                            if n in bad else sent(n), 0)
        for n in range(6)), return_exceptions=True)
    for n in set(range(6)) - bad:
        assert answers[n] == sent(n)
        assert await stores.messages.get("sms", "+1", f"m{n}") == sent(n)
    errors = [answers[n] for n in sorted(bad)]
    assert all(isinstance(e, MappingNotWritten) for e in errors), errors
    assert errors[0] is not errors[1]
    assert all(e.__cause__ is not None for e in errors)  # the database's own error
    for n in bad:
        assert await stores.messages.get("sms", "+1", f"m{n}") is None


async def test_a_writer_cancelled_before_it_ran_fails_its_puts_and_the_next_put_writes(
        stores: Stores) -> None:
    put = asyncio.create_task(stores.messages.put("sms", "+1", "m1", sent(1), 0))
    await asyncio.sleep(0)  # the put is waiting; its writer has not run yet
    writer = stores.messages._writer
    assert writer is not None
    writer.cancel()
    with pytest.raises(RuntimeError, match="stopping"):
        await asyncio.wait_for(put, 30)  # bounded: before, the put waited forever
    assert await stores.messages.put("sms", "+1", "m2", sent(2), 0) == sent(2)
    assert await stores.messages.get("sms", "+1", "m2") == sent(2)


async def test_a_writer_cancelled_mid_batch_fails_each_put_on_its_own(stores: Stores) -> None:
    puts = [asyncio.create_task(stores.messages.put("sms", "+1", f"m{n}", sent(n), 0))
            for n in range(3)]
    await asyncio.sleep(0)
    writer = stores.messages._writer
    assert writer is not None
    await asyncio.sleep(0)  # the writer has started its INSERT
    writer.cancel()
    results = await asyncio.wait_for(asyncio.gather(*puts, return_exceptions=True), 30)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, RuntimeError) for r in failed), results
    assert len({id(r) for r in failed}) == len(failed)
    assert await stores.messages.put("sms", "+1", "later", sent(9), 0) == sent(9)


async def test_drain_waits_for_every_put_so_far(stores: Stores) -> None:
    puts = [asyncio.create_task(stores.messages.put("sms", "+1", f"m{n}", sent(n), 0))
            for n in range(5)]
    await asyncio.sleep(0)
    await stores.messages.drain()
    for n in range(5):
        assert await stores.messages.get("sms", "+1", f"m{n}") == sent(n)
    await asyncio.gather(*puts)


async def test_a_put_inside_a_callers_connection_is_refused(stores: Stores) -> None:
    """It would wait forever on SQLite (the caller holds the one connection)."""
    async with stores.db.acquire():
        with pytest.raises(AssertionError, match="acquire"):
            await stores.messages.put("sms", "+1", "m", sent(1), 0)
