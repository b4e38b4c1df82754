"""Per-key locks: one holder per key, a bounded wait, nothing kept once unused."""

from __future__ import annotations

import asyncio

import pytest

from dmbridge.locks import KeyedLocks, LockWaitTimeout


async def test_a_second_holder_waits_at_most_as_long_as_it_said() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        async with locks.hold("pair"):
            entered.set()
            await release.wait()

    holder = asyncio.create_task(first())
    await entered.wait()
    with pytest.raises(LockWaitTimeout):
        async with locks.hold("pair", wait=0.05):
            raise AssertionError("entered a held lock")
    async with locks.hold("other", wait=0.05):
        pass  # other keys are free
    release.set()
    await holder
    async with locks.hold("pair", wait=0.05):
        pass
    assert locks._locks == {}


async def test_an_error_inside_releases_the_lock() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    with pytest.raises(ValueError):
        async with locks.hold("pair"):
            raise ValueError
    async with locks.hold("pair", wait=0.05):
        pass
    assert locks._locks == {}
