"""The listener under abuse, with the bridge as a real process against the session's Synapse.

Clients that connect and say nothing, trickle their headers or stall their bodies must neither
exhaust the bridge's file descriptors nor keep the homeserver's transactions or the platform's
requests from being served, nor flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dmbridge.listener import connection_cap
from tests.integration.conftest import Homeserver, NewHuman, Platform, accept_dm
from tests.integration.test_media import png
from tests.support.process import BridgeProcess
from tests.support.settings import HS_TOKEN, SMS_TOKEN

pytestmark = pytest.mark.integration

IDLE_CONNECTIONS = 2000
NOFILE = 1024
PNG = png(4, 4)


def _phone() -> str:
    return "+1555" + str(uuid.uuid4().int)[:7]


@contextlib.contextmanager
def fd_limit_at_least(wanted: int) -> Iterator[None]:
    """Raise this process's soft descriptor limit for the test's own sockets; restore it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"the hard descriptor limit ({hard}) is below {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.asynccontextmanager
async def bridge_process(homeserver: Homeserver, folder: Path, *, nofile: int | None = None,
                         env: dict[str, str] | None = None, **overrides: Any
                         ) -> AsyncIterator[BridgeProcess]:
    homeserver.settings(f"sqlite:///{folder / 'dmbridge.db'}", folder, **overrides)
    async with BridgeProcess(folder / "config.yaml", folder / "bridge.log", nofile=nofile,
                             env=env) as proc:
        proc.start()
        await proc.wait_ready(homeserver.bridge_port)
        yield proc
        assert await proc.terminate(timeout=15.0) == 0, proc.log_tail()


async def _message_pulled(platform: Platform, text: str) -> dict[str, Any]:
    """Pull the sms network's events until the human's message with this text arrives."""
    after = None
    for _ in range(20):
        params = {"wait": "5"} | ({"after": str(after)} if after is not None else {})
        status, got = await platform.call("GET", "/networks/sms/events", SMS_TOKEN,
                                          params=params)
        assert status == 200, got
        for event in got["events"]:
            if event["type"] == "message" and event["message"].get("text") == text:
                return dict(event)
        after = got["next_after"]
    raise AssertionError(f"the platform never received {text!r}")


async def test_idle_connections_beyond_the_descriptor_limit_leave_the_bridge_serving(
    homeserver: Homeserver, tmp_path: Path, new_human: NewHuman,
) -> None:
    """2,000 idle connections against a 1,024-descriptor limit: the homeserver's transactions
    and the platform's sends are still served, and the log stays small."""
    human, phone = await new_human(), _phone()
    # Silent connections are closed after header_timeout too: make it long, so only the cap
    # makes room here, however slowly this machine opens the connections.
    async with bridge_process(homeserver, tmp_path / "bridge", nofile=NOFILE,
                              **{"logging.level": "INFO",
                                 "appservice.listener": {"header_timeout": 600}}) as proc, \
            aiohttp.ClientSession() as before:
        platform = Platform(before, homeserver.bridge_port)
        status, first = await platform.send("sms", SMS_TOKEN, "m-1", sender=phone,
                                            recipient=human.user_id, text="before the flood")
        assert status == 200, first
        room_id = first["room_id"]
        await accept_dm(human, room_id, None)
        fds_before = len(proc.open_fds())
        log_before = proc.log_path.stat().st_size

        with fd_limit_at_least(IDLE_CONNECTIONS + 512):
            idle: list[asyncio.StreamWriter] = []
            try:
                started = time.monotonic()
                for _ in range(IDLE_CONNECTIONS):
                    _, writer = await asyncio.open_connection("127.0.0.1",
                                                              homeserver.bridge_port)
                    idle.append(writer)
                opened_in = time.monotonic() - started
                fds_flooded = len(proc.open_fds())
                assert fds_flooded < NOFILE, "the bridge is at its descriptor limit"

                # (a) The homeserver's transactions: one sent directly with the hs_token ...
                async with aiohttp.ClientSession() as hs:
                    t0 = time.monotonic()
                    async with hs.put(
                        f"http://127.0.0.1:{homeserver.bridge_port}/_matrix/app/v1/"
                        f"transactions/flood-{uuid.uuid4().hex}",
                        json={"events": []}, headers={"Authorization": f"Bearer {HS_TOKEN}"},
                    ) as resp:
                        assert resp.status == 200, await resp.text()
                    txn_served_in = time.monotonic() - t0
                # ... and a real one: the human writes, the platform receives it.
                async with aiohttp.ClientSession() as after:
                    platform = Platform(after, homeserver.bridge_port)
                    t0 = time.monotonic()
                    await human.say(room_id, "during the flood")
                    event = await _message_pulled(platform, "during the flood")
                    reply_in = time.monotonic() - t0
                    assert (event["remote_id"], event["room_id"]) == (phone, room_id)

                    # (b) The platform's send is answered and the human sees it.
                    t0 = time.monotonic()
                    status, sent = await platform.send("sms", SMS_TOKEN, "m-2", sender=phone,
                                                       recipient=human.user_id,
                                                       text="answered during the flood")
                    send_in = time.monotonic() - t0
                    assert status == 200, sent
                    assert sent["room_id"] == room_id
                seen = await human.wait_messages(room_id, 3)
                assert [m["content"]["body"] for m in seen if m["sender"] != human.user_id] == [
                    "before the flood", "answered during the flood"]
            finally:
                for writer in idle:
                    writer.close()
                await asyncio.sleep(0.5)

        # (c) Alive, and the log did not grow by more than a few lines and their summary.
        assert proc.running, proc.log_tail()
    log_growth = proc.log_path.stat().st_size - log_before
    log = proc.log_path.read_text(errors="replace")
    assert log_growth < 64 * 1024, proc.log_tail()
    # Each connection closed at the cap was counted: a few lines, the rest in a summary.
    lines = log.count("WARNING dmbridge.listener: connection cap reached")
    suppressed = sum(map(int, re.findall(
        r"WARNING dmbridge.listener: suppressed (\d+) similar lines", log)))
    assert 0 < lines <= 20 and lines + suppressed >= IDLE_CONNECTIONS - connection_cap(0, NOFILE)
    assert "Too many open files" not in log
    print(f"\nflood: {IDLE_CONNECTIONS} connections opened in {opened_in:.2f} s; bridge fds "
          f"{fds_before} before, {fds_flooded} during (limit {NOFILE}); empty transaction "
          f"answered in {txn_served_in * 1000:.0f} ms; human's message reached the platform "
          f"in {reply_in:.2f} s; platform send answered in {send_in:.2f} s; log grew by "
          f"{log_growth} bytes, {lines} cap warnings and {suppressed} counted in summaries")


async def _raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the bridge still says before it closes the connection (bounded wait)."""
    data = b""
    async with asyncio.timeout(30):
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                data += chunk
    return data


def _spool_files(proc: BridgeProcess, tmp: Path) -> list[str]:
    return [target for target in proc.open_fds() if target.startswith(str(tmp))]


async def test_slow_headers_and_stalled_uploads_are_cut_off_and_leave_nothing_behind(
    homeserver: Homeserver, tmp_path: Path, platform: Platform,
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    listener = {"header_timeout": 1, "body_stall_timeout": 2, "max_uploads_per_network": 1}
    async with bridge_process(homeserver, tmp_path / "bridge", env={"TMPDIR": str(tmp)},
                              **{"appservice.listener": listener}) as proc:
        port = homeserver.bridge_port

        # A slow loris: one header byte a second is cut off after header_timeout.
        reader, writer = await _raw(port)
        header, sent = b"GET /_dmbridge/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaa", 0
        for byte in header:  # 30 s for the whole header, were it allowed
            if reader.at_eof():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
            await asyncio.sleep(0.5)
        assert reader.at_eof() or await _closed(reader) == b""
        assert sent < len(header), "the bridge waited for the whole slow header"
        writer.close()

        # A stalled upload: its spool file exists while it is held ...
        reader, writer = await _raw(port)
        writer.write(b"POST /_dmbridge/v1/networks/sms/media HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + SMS_TOKEN.encode() + b"\r\n"
                     b"Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n" + PNG[:40])
        await writer.drain()
        for _ in range(100):
            if _spool_files(proc, tmp):
                break
            await asyncio.sleep(0.05)
        assert _spool_files(proc, tmp), "the upload was never spooled"

        # ... a second upload of the same network meanwhile is refused ...
        status, busy = await platform.call("POST", "/networks/sms/media", SMS_TOKEN, data=PNG,
                                           params={"filename": "second.png"})
        assert (status, busy["errcode"]) == (429, "M_LIMIT_EXCEEDED"), busy
        assert "max_uploads_per_network" in busy["error"]

        # ... the stall is answered 408 and the connection closed ...
        answer = await _closed(reader)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"DMBRIDGE_BODY_TIMEOUT" in answer
        writer.close()

        # ... and nothing is left: no open spool file, nothing in the temp folder.
        assert _spool_files(proc, tmp) == []
        assert list(tmp.iterdir()) == []

        # An upload the client gives up on halfway leaves nothing either, and no error trace.
        reader, writer = await _raw(port)
        writer.write(b"POST /_dmbridge/v1/networks/sms/media HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + SMS_TOKEN.encode() + b"\r\n"
                     b"Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n" + PNG[:40])
        await writer.drain()
        for _ in range(100):
            if _spool_files(proc, tmp):
                break
            await asyncio.sleep(0.05)
        assert _spool_files(proc, tmp), "the upload was never spooled"
        writer.transport.abort()
        for _ in range(100):
            if not _spool_files(proc, tmp):
                break
            await asyncio.sleep(0.05)
        assert _spool_files(proc, tmp) == []
        assert list(tmp.iterdir()) == []

        # The slot is free again: an upload that flows is accepted.
        status, stored = await platform.call("POST", "/networks/sms/media", SMS_TOKEN, data=PNG,
                                             params={"filename": "dot.png"})
        assert status == 201, stored
        assert list(tmp.iterdir()) == []
        log = proc.log_path.read_text(errors="replace")
        assert "no complete request headers within 1" in log
        assert "the request body stalled" in log
        assert "Traceback" not in log, log
