"""A bridge that stops with in-process calls under way (against a fake homeserver)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dmbridge_client as sdk
import pytest

from dmbridge.bridge import Bridge
from dmbridge.embedded import client_for
from dmbridge.localhs import free_port
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.settings import make_settings

PHONE = "+15551234567"


async def test_stop_finishes_an_in_process_send_its_caller_abandoned_and_records_it(
    hs: FakeHomeserver, db_url: str, tmp_path: Path
) -> None:
    alice = hs.add_human("alice")
    settings = make_settings(tmp_path, homeserver_url=hs.url, domain="localhost",
                             port=free_port(), db_url=db_url)
    bridge = Bridge(settings)
    await bridge.start()
    client = client_for(bridge, "sms", max_retries=0)
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held() -> None:
        arrived.set()
        await release.wait()

    hs.before["PUT send"] = held
    sending = asyncio.create_task(client.send_message(PHONE, alice, "Hello", message_id="m1"))
    await arrived.wait()
    sending.cancel()  # as Ctrl-C cancels the handler that was replying
    with pytest.raises(asyncio.CancelledError):
        await sending
    stopping = asyncio.create_task(bridge.stop())
    for _ in range(50):
        await asyncio.sleep(0)
    assert not stopping.done()  # the homeserver has not answered the send yet
    with pytest.raises(sdk.NotReady, match="the bridge is stopping"):
        await client.send_message(PHONE, alice, "Later", message_id="m2")
    release.set()
    await stopping
    await client.close()
    assert hs.names().count("PUT send") == 1

    bridge.sole_worker.release()
    again = Bridge(settings)
    await again.start()
    try:
        async with client_for(again, "sms") as client:
            sent = await client.send_message(PHONE, alice, "Hello", message_id="m1")
        assert sent.duplicate  # its mapping was recorded before the database closed
        assert hs.names().count("PUT send") == 1
    finally:
        await again.stop()
