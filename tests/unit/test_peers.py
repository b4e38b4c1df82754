"""Workers on one PostgreSQL wake each other through LISTEN/NOTIFY, and fall back on polling."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from dmbridge.peers import Peers


class Heard:
    """What one worker was told by the others."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[set[str]] = asyncio.Queue()
        self.invites: asyncio.Queue[None] = asyncio.Queue()

    def peers(self, url: str) -> Peers:
        return Peers(url, on_outbox=self.outbox.put_nowait,
                     on_invites=lambda: self.invites.put_nowait(None))


@asynccontextmanager
async def _workers(url: str) -> AsyncIterator[tuple[Peers, Peers, Heard, Heard]]:
    heard = Heard(), Heard()
    workers = [h.peers(url) for h in heard]
    for worker in workers:
        worker.start()
    try:
        yield workers[0], workers[1], heard[0], heard[1]
    finally:
        for worker in workers:
            await worker.stop()


async def _listening(*workers: Peers) -> None:
    async with asyncio.timeout(10):
        for worker in workers:
            await worker.listening.wait()


async def _told(queue: asyncio.Queue[object]) -> object:
    async with asyncio.timeout(10):
        return await queue.get()


async def test_new_work_wakes_the_other_worker_not_itself(module_pg_url: str) -> None:
    async with _workers(module_pg_url) as (a, b, heard_a, heard_b):
        await _listening(a, b)
        a.outbox_queued({"sms"})
        a.outbox_queued({"chat"})
        a.invites_queued()
        got: set[str] = set()
        while got != {"sms", "chat"}:
            got |= await _told(heard_b.outbox)  # type: ignore[arg-type]
        await _told(heard_b.invites)
        assert b.heard["dmbridge_invites"] == 1
        b.outbox_queued({"sms"})
        assert await _told(heard_a.outbox) == {"sms"}
        assert heard_b.outbox.empty() and heard_a.invites.empty()
        assert a.heard["dmbridge_invites"] == 0


async def test_a_dropped_connection_is_told_and_made_again(
    module_pg_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    async with _workers(module_pg_url) as (a, b, _, heard_b):
        await _listening(a, b)
        conn = await asyncpg.connect(module_pg_url)
        try:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                               " WHERE application_name='dmbridge-peers'")
        finally:
            await conn.close()
        async with asyncio.timeout(10):
            while len(_lost(caplog)) < 2:  # noqa: ASYNC110 (log records cannot be awaited)
                await asyncio.sleep(0.02)
        # Both made it again (not a flag read at one moment: the new connection may be up
        # before the test looks).
        async with asyncio.timeout(10):
            while len(_again(caplog)) < 2:  # noqa: ASYNC110 (log records cannot be awaited)
                await asyncio.sleep(0.02)
        await _listening(a, b)
        a.invites_queued()
        await _told(heard_b.invites)


def _again(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO
            and "listening for other workers' new work again" in r.getMessage()]


def _lost(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and "lost the connection that hears other workers" in r.getMessage()]


async def test_sqlite_has_no_peers(tmp_path: Path) -> None:
    heard = Heard()
    worker = heard.peers(f"sqlite:///{tmp_path / 'dmbridge.db'}")
    worker.start()
    worker.outbox_queued({"sms"})
    worker.invites_queued()
    await worker.stop()
    assert not worker.enabled and heard.outbox.empty()
