"""The SDK's receiving side against a fake bridge: the pull loop, signatures, repeats."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import dmbridge_client as sdk
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from dmbridge_client.handlers import Once
from dmbridge_client.webhook import signature, verified


def _message(event_id: int, text: str) -> dict[str, Any]:
    return {"id": event_id, "type": "message", "idempotency_key": f"$e{event_id}",
            "network": "chat", "remote_id": "bob", "ghost_id": "@dm_chat_bob:x",
            "user_id": "@alice:x", "room_id": "!r", "queued_at": 1,
            "message": {"event_id": f"$e{event_id}", "sender": {"user_id": "@alice:x",
                                                                "displayname": None},
                        "recipient": "bob", "msgtype": "m.text", "text": text, "html": None,
                        "media": None, "reply_to": None, "sent_at": 1}}


class FakeEvents:
    """The pull API of a fake bridge: events above the cursor that are not acknowledged."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.acks: list[list[int]] = []
        self.afters: list[int] = []
        self.refuse_acks = 0  # how many acknowledgements to answer 500

    async def pull(self, request: web.Request) -> web.Response:
        after = int(request.query["after"])
        self.afters.append(after)
        acked = {i for ids in self.acks for i in ids}
        fresh = [e for e in self.events if e["id"] > after and e["id"] not in acked]
        if not fresh:
            await asyncio.sleep(0.05)
        return web.json_response({"events": fresh,
                                  "next_after": max([after, *(e["id"] for e in fresh)])})

    async def ack(self, request: web.Request) -> web.Response:
        ids = (await request.json())["ids"]
        if self.refuse_acks:
            self.refuse_acks -= 1
            return web.json_response({"errcode": "M_UNKNOWN", "error": "db down"}, status=500)
        self.acks.append(ids)
        return web.json_response({"acknowledged": len(ids)})


@pytest.fixture
async def fake(aiohttp_server: Any) -> tuple[FakeEvents, str]:
    events = FakeEvents([_message(1, "one"), _message(2, "two")])
    app = web.Application()
    app.router.add_get("/_dmbridge/v1/networks/chat/events", events.pull)
    app.router.add_post("/_dmbridge/v1/networks/chat/events/ack", events.ack)
    server: TestServer = await aiohttp_server(app)
    return events, str(server.make_url("")).rstrip("/")


async def test_run_acknowledges_after_the_handler_succeeded_and_keeps_its_cursor(
    fake: tuple[FakeEvents, str], tmp_path: Path
) -> None:
    """A handler that fails is run again; each event is acknowledged once handled; the
    cursor file lets the next run start after what was done."""
    events, url = fake
    tries: list[str] = []
    client = sdk.Client(url, "t", "chat")

    @client.on_direct_message
    async def handle(message: sdk.DirectMessage) -> None:
        tries.append(message.text)
        if tries == ["one"]:
            raise RuntimeError("the platform's database is busy")
        if message.text == "two":
            client.stop()

    cursor = tmp_path / "cursor"
    async with client:
        await client.run(cursor_file=cursor, wait=0, handle_signals=False)
    assert tries == ["one", "one", "two"] and events.acks == [[1], [2]]
    assert cursor.read_text() == "2\n"

    events.events.append(_message(3, "three"))
    polls_before = len(events.afters)
    again = sdk.Client(url, "t", "chat")
    again.on_direct_message(lambda m: _stop_after(again, m, tries))
    async with again:
        await again.run(cursor_file=cursor, wait=0, handle_signals=False)
    assert events.afters[polls_before] == 2  # the restarted loop continues from the file
    assert tries[-1] == "three" and events.acks[-1] == [3]


async def _stop_after(client: sdk.Client, message: sdk.DirectMessage, seen: list[str]) -> None:
    seen.append(message.text)
    client.stop()


async def test_an_event_whose_handler_keeps_failing_is_left_unacknowledged(
    fake: tuple[FakeEvents, str]
) -> None:
    events, url = fake
    client = sdk.Client(url, "t", "chat")

    @client.on_direct_message
    async def handle(message: sdk.DirectMessage) -> None:
        if message.text == "one":
            raise RuntimeError("cannot store it")
        client.stop()

    async with client:
        await client.run(wait=0, handler_attempts=2, handle_signals=False)
    assert events.acks == [[2]]


async def test_a_failed_acknowledgement_is_logged_and_the_loop_goes_on(
    fake: tuple[FakeEvents, str], caplog: pytest.LogCaptureFixture
) -> None:
    events, url = fake
    events.refuse_acks = 1
    handled: list[str] = []
    client = sdk.Client(url, "t", "chat")

    @client.on_direct_message
    async def handle(message: sdk.DirectMessage) -> None:
        handled.append(message.text)
        if message.text == "two":
            client.stop()

    async with client:
        await client.run(wait=0, handle_signals=False)
    assert handled == ["one", "two"] and events.acks == [[2]]
    assert "acknowledging event 1 failed: 500 M_UNKNOWN: db down" in caplog.text


async def test_the_loop_keeps_polling_through_server_and_proxy_errors(
    aiohttp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events = FakeEvents([_message(1, "one")])
    failures = [web.json_response({"errcode": "M_UNKNOWN", "error": "db down"}, status=500),
                web.Response(status=502, text="<html>Bad Gateway</html>")]

    async def pull(request: web.Request) -> web.Response:
        return failures.pop(0) if failures else await events.pull(request)

    app = web.Application()
    app.router.add_get("/_dmbridge/v1/networks/chat/events", pull)
    app.router.add_post("/_dmbridge/v1/networks/chat/events/ack", events.ack)
    server: TestServer = await aiohttp_server(app)
    client = sdk.Client(str(server.make_url("")).rstrip("/"), "t", "chat", max_retries=0)
    handled: list[str] = []

    @client.on_direct_message
    async def handle(message: sdk.DirectMessage) -> None:
        handled.append(message.text)
        client.stop()

    async with client:
        await client.run(wait=0, handle_signals=False)
    assert handled == ["one"] and events.acks == [[1]]
    assert "pulling events failed: 500 M_UNKNOWN: db down" in caplog.text
    assert "pulling events failed: 502" in caplog.text


async def test_a_refused_token_ends_the_loop_with_its_error(aiohttp_server: Any) -> None:
    polls: list[str] = []

    async def pull(request: web.Request) -> web.Response:
        polls.append(request.path)
        return web.json_response({"errcode": "M_UNKNOWN_TOKEN", "error": "who?"}, status=401)

    app = web.Application()
    app.router.add_get("/_dmbridge/v1/networks/chat/events", pull)
    server: TestServer = await aiohttp_server(app)
    async with sdk.Client(str(server.make_url("")).rstrip("/"), "t", "chat") as client:
        with pytest.raises(sdk.UnknownToken):
            await client.run(wait=0, handle_signals=False)
    assert len(polls) == 1


async def test_sigterm_ends_run_after_the_event_in_hand(fake: tuple[FakeEvents, str],
                                                        tmp_path: Path) -> None:
    events, url = fake
    # run() takes SIGTERM over only in the main thread; anywhere else the signal below would
    # end the test process itself.
    assert threading.current_thread() is threading.main_thread()
    handled: list[str] = []
    client = sdk.Client(url, "t", "chat")

    @client.on_direct_message
    async def handle(message: sdk.DirectMessage) -> None:
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # run() has it
        os.kill(os.getpid(), signal.SIGTERM)  # this process's own: run() catches it
        await asyncio.sleep(0.05)
        handled.append(message.text)

    async with client:
        await client.run(cursor_file=tmp_path / "cursor", wait=0)
    assert handled == ["one"] and events.acks == [[1]]
    assert not (tmp_path / "cursor").exists()  # event 2 was not handled: the cursor stays


async def test_stop_ends_a_failing_handlers_retries_and_leaves_its_event(
    fake: tuple[FakeEvents, str]
) -> None:
    events, url = fake
    tries: list[str] = []
    client = sdk.Client(url, "t", "chat")

    @client.on_direct_message
    async def handle(message: sdk.DirectMessage) -> None:
        tries.append(message.text)
        client.stop()
        raise RuntimeError("the platform is shutting down")

    async with client:
        await client.run(wait=0, handler_attempts=5, handle_signals=False)
    assert tries == ["one"] and events.acks == []


async def test_a_second_sigterm_cancels_a_run_stuck_in_a_handler(
    fake: tuple[FakeEvents, str]
) -> None:
    events, url = fake
    assert threading.current_thread() is threading.main_thread()
    client = sdk.Client(url, "t", "chat")

    @client.on_direct_message
    async def handle(message: sdk.DirectMessage) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(60)  # stuck; the second signal must not wait for it

    async with client:
        running = asyncio.create_task(client.run(wait=0))
        with pytest.raises(asyncio.CancelledError):
            await running
    assert running.cancelled() and events.acks == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back


def test_signatures_are_checked_over_the_raw_body_within_the_window() -> None:
    body = b'{"id":1}'
    now = time.time()
    ts = str(int(now))
    good = signature("s3cret", ts, body)
    assert verified("s3cret", ts, good, body, now=now)
    assert not verified("s3cret", ts, good, body + b" ", now=now)
    assert not verified("other", ts, good, body, now=now)
    assert not verified("s3cret", ts, good, body, now=now + 301)
    assert not verified("s3cret", ts, good, body, now=now - 301)
    assert not verified("s3cret", "", good, body, now=now)
    assert not verified("s3cret", ts, "sha256=é", body, now=now)


async def test_once_runs_concurrent_repeats_once_and_a_failure_again() -> None:
    runs: list[str] = []

    async def slow() -> None:
        runs.append("slow")
        await asyncio.sleep(0.05)

    once = Once()
    results = await asyncio.gather(once.run("k", slow), once.run("k", slow),
                                   once.run("k", slow))
    assert runs == ["slow"] and sorted(results) == [False, False, True]
    assert await once.run("k", slow) is False

    async def failing() -> None:
        runs.append("failing")
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        await once.run("f", failing)
    with pytest.raises(RuntimeError):
        await once.run("f", failing)
    assert runs.count("failing") == 2
