"""The nginx configuration in the README is the one the workers' test runs, and what nginx
answers by itself (a body too large, no worker reachable) reads like the bridge's answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from dmbridge.localhs import free_port
from tests.conftest import REQUIRE_ALL
from tests.support.nginx import CONFIG, NGINX, Nginx, children, render

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE = Path(__file__).resolve().parents[2] / "dmbridge" / "example-config.yaml"
LOG = Path("/tmp/run/access.log")


def test_the_readme_shows_contrib_nginx_dmbridge_conf_as_it_is() -> None:
    blocks = re.findall(r"^```nginx\n(.*?)^```$", README.read_text(), re.MULTILINE | re.DOTALL)
    assert blocks == [CONFIG.read_text()]


def test_the_test_runs_the_shipped_configuration_with_its_own_ports_and_log() -> None:
    rendered = render(CONFIG.read_text(), 40000, [40001, 40002], LOG)
    shipped = CONFIG.read_text().splitlines()
    changed = [line for line in rendered.splitlines() if line not in shipped]
    assert changed == ["    server 127.0.0.1:40001 max_fails=3 fail_timeout=10s;",
                       "    server 127.0.0.1:40002 max_fails=3 fail_timeout=10s;",
                       "    listen 127.0.0.1:40000;",
                       "    access_log /tmp/run/access.log dmbridge;"]
    assert [line for line in shipped if line not in rendered.splitlines()] == [
        "    server 127.0.0.1:29341 max_fails=3 fail_timeout=10s;",
        "    server 127.0.0.1:29342 max_fails=3 fail_timeout=10s;",
        "    server 127.0.0.1:29343 max_fails=3 fail_timeout=10s;",
        "    listen 127.0.0.1:29340;",
        "    access_log /var/log/nginx/dmbridge.access.log dmbridge;"]


def test_nginx_takes_an_upload_the_bridge_takes_so_the_bridge_refuses_larger_ones() -> None:
    """nginx lets a body through up to client_max_body_size; the bridge's default upload limit
    stays below it, so an upload just over that limit gets the bridge's 413 M_TOO_LARGE."""
    found = re.search(r"^\s*client_max_body_size (\d+)m;$", CONFIG.read_text(), re.MULTILINE)
    assert found is not None
    max_upload = int(re.search(r"^\s*max_upload_bytes: (\d+)", EXAMPLE.read_text(),
                               re.MULTILINE)[1])  # type: ignore[index]
    assert int(found[1]) * 1024 * 1024 > max_upload + 1024  # and its multipart headers


@pytest.fixture
async def worker() -> AsyncIterator[tuple[int, list[str | None], web.AppRunner]]:
    """A stand-in worker that notes the X-Request-ID of each request it gets."""
    seen: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Request-ID"))
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port, seen, runner
    finally:
        await runner.cleanup()


async def _oversized(url_port: int) -> tuple[int, str, str]:
    """Headers announcing a body over client_max_body_size; nginx answers before the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", url_port)
    try:
        writer.write(b"POST /_dmbridge/v1/networks/sms/media HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: image/png\r\nContent-Length: 536870912\r\n"
                     b"Connection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    status = int(head.split()[1])
    content_type = re.search(r"(?im)^content-type: (\S+)", head)
    return status, content_type[1] if content_type else "", body


async def test_nginx_passes_request_ids_and_answers_its_own_errors_in_json(
    tmp_path: Path, worker: tuple[int, list[str | None], web.AppRunner],
) -> None:
    if not NGINX.is_file():
        if REQUIRE_ALL:
            pytest.fail(f"nginx is not installed ({NGINX}; apt-get install nginx)")
        pytest.skip("nginx is not installed")
    port, seen, runner = worker
    balancer = Nginx(tmp_path / "nginx", free_port(), [port])
    await balancer.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{balancer.url}/health", headers={"X-Request-ID": "plat-42"}):
                pass
            async with http.get(f"{balancer.url}/health"):
                pass
            status, content_type, body = await _oversized(balancer.listen_port)
            assert (status, content_type) == (413, "application/json")
            assert json.loads(body)["errcode"] == "M_TOO_LARGE"

            await runner.cleanup()  # no worker left to answer
            async with http.get(f"{balancer.url}/health") as resp:
                assert resp.status == 502
                assert resp.content_type == "application/json"
                assert (await resp.json())["errcode"] == "M_UNKNOWN"
                assert resp.headers["X-Request-ID"]
    finally:
        balancer.stop()
    assert seen[0] == "plat-42"
    assert seen[1] is not None and re.fullmatch(r"[0-9a-f]{32}", seen[1])
    logged = balancer.access_log.read_text().splitlines()
    assert "request_id=plat-42" in logged[0]
    assert f"request_id={seen[1]}" in logged[1]
    assert 'upstream="-"' in logged[2] and " 413 " in logged[2]


async def test_a_stuck_nginx_is_stopped_with_its_workers(tmp_path: Path) -> None:
    """The master does not answer SIGQUIT: stop() kills it and its workers, and the port is
    free again (killed alone, the master leaves its workers listening)."""
    if not NGINX.is_file():
        pytest.skip("nginx is not installed")
    balancer = Nginx(tmp_path / "nginx", free_port(), [free_port()])
    await balancer.start()
    assert balancer.pid is not None
    workers = children(balancer.pid)
    assert workers
    os.kill(balancer.pid, signal.SIGSTOP)  # SIGQUIT now waits, as with a hung master
    try:
        await asyncio.to_thread(balancer.stop)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(balancer.pid, signal.SIGCONT)
    for _ in range(100):  # bounded: the kernel takes the killed workers away
        if not any(_alive(pid) for pid in workers):
            break
        await asyncio.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", balancer.listen_port)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
