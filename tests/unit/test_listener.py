"""The listener's connection cap and timeouts: the table's choices, then a real aiohttp server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web

from dmbridge.listener import (
    MIN_FD_RESERVE,
    ConnectionTable,
    Listener,
    ListenerSettings,
    connection_cap,
)

# --- the table, with stand-in connections ------------------------------------------------------


@dataclass(eq=False)
class FakeConn:
    name: str
    busy: bool = False

    def close_for(self, reason: str) -> None:
        pass


def test_the_cap_closes_the_least_recently_active_idle_connection() -> None:
    table = ConnectionTable(cap=3)
    a, b, c, d = (FakeConn(n) for n in "abcd")
    assert table.opened(a) == [] and table.opened(b) == [] and table.opened(c) == []
    table.active(a)  # a answered a request since: b is now the one idle the longest
    assert table.opened(d) == [b]
    assert len(table) == 3


def test_connections_with_a_request_in_flight_are_kept() -> None:
    table = ConnectionTable(cap=2)
    a, b, c = FakeConn("a", busy=True), FakeConn("b"), FakeConn("c")
    table.opened(a)
    table.opened(b)
    assert table.opened(c) == [b]


def test_the_new_connection_is_refused_when_every_other_is_busy() -> None:
    table = ConnectionTable(cap=2)
    a, b, c = FakeConn("a", busy=True), FakeConn("b", busy=True), FakeConn("c")
    table.opened(a)
    table.opened(b)
    assert table.opened(c) == [c]
    assert len(table) == 2
    table.closed(a)
    assert table.opened(FakeConn("d")) == []


def test_the_cap_leaves_descriptors_for_everything_else(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    assert connection_cap(0, 1024) == 1024 - MIN_FD_RESERVE
    assert connection_cap(0, 65536) == 65536 - 65536 // 4
    assert connection_cap(0, 256) == 16  # never nothing
    assert connection_cap(100, 1024) == 100
    with caplog.at_level(logging.WARNING, "dmbridge.listener"):
        assert connection_cap(5000, 1024) == 512
    assert "leaves room for 512" in caplog.text


# --- a real server -----------------------------------------------------------------------------


class Server:
    def __init__(self, listener: Listener, started: asyncio.Event, release: asyncio.Event
                 ) -> None:
        self.listener = listener
        self.started = started
        self.release = release

    @property
    def port(self) -> int:
        assert self.listener.port is not None
        return self.listener.port

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def _fast(_: web.Request) -> web.Response:
    return web.json_response({"fast": True})


async def _upload(request: web.Request) -> web.Response:
    size = 0
    async for chunk in request.content.iter_chunked(1024):
        size += len(chunk)
    return web.json_response({"size": size})


@contextlib.asynccontextmanager
async def serve(**settings: float) -> AsyncIterator[Server]:
    listener = Listener(ListenerSettings(**settings))  # type: ignore[arg-type]
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.json_response({"slow": True})

    app = web.Application()
    app.router.add_get("/fast", _fast)
    app.router.add_get("/slow", slow)
    app.router.add_post("/upload", _upload)
    listener.install(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await listener.start(runner, "127.0.0.1", 0)
    try:
        yield Server(listener, started, release)
    finally:
        release.set()
        await runner.cleanup()


async def closed(reader: asyncio.StreamReader, within: float = 20.0) -> bool:
    """Whether the server closes the connection (reads to EOF) within a generous bound."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
                  ) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(20):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        return head.split(b"\r\n")[0] + b" " + await reader.readexactly(length)


async def test_at_the_cap_an_idle_connection_makes_room_and_a_busy_one_is_kept() -> None:
    async with serve(max_connections=2) as server:
        idle_r, idle_w = await server.connect()
        busy_r, busy_w = await server.connect()
        busy_w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await busy_w.drain()
        async with asyncio.timeout(20):
            await server.started.wait()

        new_r, new_w = await server.connect()
        assert await request(new_r, new_w, "/fast") == b'HTTP/1.1 200 OK {"fast": true}'
        assert await closed(idle_r), "the idle connection was not closed at the cap"

        server.release.set()  # the request in flight was kept and is answered
        async with asyncio.timeout(20):
            head = await busy_r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        for w in (idle_w, busy_w, new_w):
            w.close()


async def test_headers_sent_slowly_are_cut_off(caplog: pytest.LogCaptureFixture) -> None:
    async with serve(header_timeout=0.5, idle_timeout=60) as server:
        reader, writer = await server.connect()
        header = b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        sent = 0
        with caplog.at_level(logging.WARNING, "dmbridge.listener"):
            for byte in header:  # one byte every 50 ms: 10 s for the header, were it allowed
                if reader.at_eof():
                    break
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                except ConnectionError:
                    break
                sent += 1
                await asyncio.sleep(0.05)
        assert sent < len(header), "the server waited for the whole slow header"
        assert await closed(reader)
        assert "no complete request headers within 0.5 s" in caplog.text
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    async with serve(header_timeout=0.5, idle_timeout=60) as server:
        reader, writer = await server.connect()
        with caplog.at_level(logging.WARNING, "dmbridge.listener"):
            assert await closed(reader)
        assert "sent nothing within 0.5 s" in caplog.text
        writer.close()


async def test_a_keep_alive_connection_is_closed_when_idle_and_not_before_its_answer(
        caplog: pytest.LogCaptureFixture) -> None:
    async with serve(header_timeout=60, idle_timeout=2) as server:
        reader, writer = await server.connect()
        for _ in range(3):  # quicker than the idle timeout: the connection is kept
            assert await request(reader, writer, "/fast") == b'HTTP/1.1 200 OK {"fast": true}'
        with caplog.at_level(logging.DEBUG, "dmbridge.listener"):
            assert await closed(reader)
        assert "idle after 3 requests" in caplog.text
        writer.close()


async def test_a_stalled_body_is_answered_408_and_the_connection_closed() -> None:
    async with serve(body_stall_timeout=0.5) as server:
        reader, writer = await server.connect()
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                     + b"x" * 10)
        await writer.drain()
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        body = await reader.read(65536)
        assert json.loads(body)["errcode"] == "DMBRIDGE_BODY_TIMEOUT"
        assert await closed(reader)
        writer.close()


async def test_a_body_that_keeps_trickling_is_bounded_overall() -> None:
    async with serve(body_stall_timeout=5, body_timeout=1) as server:
        reader, writer = await server.connect()
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        answer = b""
        for _ in range(400):  # a byte every 50 ms: never a stall, never the end
            try:
                writer.write(b"x")
                await writer.drain()
            except ConnectionError:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    answer += await reader.read(65536)
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"did not arrive within 1 s" in answer
        writer.close()


async def test_a_body_that_flows_is_not_cut() -> None:
    async with serve(body_stall_timeout=2, body_timeout=30) as server:
        reader, writer = await server.connect()
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n")
        for _ in range(30):  # longer than the stall timeout overall, but never pausing that long
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.1)
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
