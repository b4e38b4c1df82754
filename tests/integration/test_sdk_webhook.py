"""The SDK's webhook application with a real bridge pushing to it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from dmbridge_client import Client, DirectMessage

from dmbridge.localhs import free_port
from tests.integration.conftest import BridgeFactory, Homeserver, accept_dm, wait_for
from tests.support.matrix import Human
from tests.support.settings import CHAT_TOKEN

SECRET = "webhook-secret-0123456789abcdef"


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    status: int


@pytest.fixture
async def receiver(homeserver: Homeserver) -> AsyncIterator[tuple[Client, str, list[Request]]]:
    """A platform's webhook receiver built from the SDK, listening on a free port; what it
    was sent and what it answered."""
    client = Client(f"http://127.0.0.1:{homeserver.bridge_port}", CHAT_TOKEN, "chat")
    app = client.webhook_app(SECRET, path="/hook")
    requests: list[Request] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        response = await handler(request)
        requests.append(Request(dict(request.headers), body, response.status))
        return response

    app.middlewares.append(record)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield client, f"http://127.0.0.1:{port}/hook", requests
    await runner.cleanup()
    await client.close()


async def test_webhook_app_handles_each_event_once_and_refuses_forgeries(
    start_bridge: BridgeFactory, receiver: tuple[Client, str, list[Request]], new_human: Any
) -> None:
    """The bridge pushes the human's messages: the handler answers in the DM; a delivery the
    bridge sends again (the handler outlasted delivery.timeout) runs the handler once; a
    tampered body or a wrong key is refused 401 and reaches no handler."""
    client, url, requests = receiver
    handled: list[str] = []

    @client.on_direct_message
    async def answer(message: DirectMessage) -> None:
        handled.append(message.text)
        if message.text == "slow" and handled.count("slow") == 1:
            await asyncio.sleep(2.5)  # longer than delivery.timeout: the bridge sends it again
        await message.reply(f"Got: {message.text}")

    bridge = await start_bridge(
        networks={"chat": {"delivery": {"mode": "webhook", "url": url, "secret": SECRET}}},
        **{"delivery.timeout": 1, "delivery.initial_backoff": 0.2, "delivery.max_backoff": 1})
    human: Human = await new_human()
    contact = f"wh{uuid.uuid4().hex[:8]}"
    first = await client.send_message(contact, human.user_id, "Hello")
    await accept_dm(human, first.room_id, bridge)

    slow = await human.say(first.room_id, "slow")
    await human.say(first.room_id, "fast")

    async def answered() -> bool:
        bodies = [m["content"]["body"] for m in await human.messages(first.room_id)]
        return any(b.endswith("Got: fast") for b in bodies)

    await wait_for(answered, timeout=60, what="the answer to 'fast'")
    attempts = [r for r in requests if r.headers.get("Idempotency-Key") == slow]
    assert len(attempts) >= 2 and {r.status for r in attempts} <= {200, 500}, attempts
    assert [r.headers["X-Dmbridge-Attempt"] for r in attempts][:2] == ["1", "2"]
    assert handled.count("slow") == 1 and handled.count("fast") == 1, handled
    bodies = [m["content"]["body"] for m in await human.messages(first.room_id)]
    assert [b.rsplit("\n", 1)[-1] for b in bodies if "Got: " in b] == ["Got: slow", "Got: fast"]

    # The bridge's own delivery, sent again as it was: answered 200, handled no more.
    real = next(r for r in requests if r.headers.get("Idempotency-Key") == slow)
    signed = {k: v for k, v in real.headers.items()
              if k.lower().startswith("x-dmbridge") or k == "Idempotency-Key"}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=real.body, headers=signed) as resp:
            assert resp.status == 200
        tampered = real.body.replace(b'"slow"', b'"SLOW"')
        async with session.post(url, data=tampered, headers=signed) as resp:
            assert (resp.status, (await resp.json())["errcode"]) == (401, "M_FORBIDDEN")
        forged = {**signed, "X-Dmbridge-Signature": "sha256=" + "0" * 64}
        async with session.post(url, data=real.body, headers=forged) as resp:
            assert resp.status == 401
    assert handled.count("slow") == 1 and "SLOW" not in handled, handled
