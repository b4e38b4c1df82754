"""An HTTP proxy in front of the homeserver that can hold, replace or fail its answers.

Everything is forwarded to the homeserver as it came. A test can make the proxy hold the answer
to the next ``POST /createRoom`` (the homeserver has made the room; the bridge never hears so),
replace an answer after the homeserver did the work (``createRoom`` made the room, the bridge
gets a 500), or answer in the homeserver's place. Runs in the test's own event loop, on
127.0.0.1 and a free port.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

_HOP_BY_HOP = frozenset({"host", "content-length", "transfer-encoding", "connection"})


@dataclass
class Rule:
    method: str
    path_end: str
    status: int
    body: dict[str, Any]
    forward: bool  # do the homeserver's work first, then answer with this instead
    times: int


class HoldingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.server: TestServer | None = None
        self.session: aiohttp.ClientSession | None = None
        self.rules: list[Rule] = []
        self.created: list[str] = []
        """Room IDs the homeserver answered createRoom with, whatever the bridge was told."""
        self.create_answers: list[tuple[int, str]] = []
        """Every createRoom answer of the homeserver: (status, body)."""
        self._hold_create = False
        self._hold_request = False
        self._held = asyncio.Event()
        self._release = asyncio.Event()
        self._created = asyncio.Event()
        self._tasks: set[asyncio.Task[web.StreamResponse]] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def stop(self) -> None:
        self._release.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.close()
        if self.session is not None:
            await self.session.close()

    async def __aenter__(self) -> HoldingProxy:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # --- what a test asks for ---------------------------------------------------------------

    def hold_create_room(self, *, request: bool = False) -> None:
        """Forward the next createRoom, but hold its answer until :meth:`release` (or stop).

        With ``request``, hold the request itself: it reaches the homeserver on release.
        """
        self._hold_create, self._hold_request = True, request
        self._held.clear()
        self._release.clear()
        self._created.clear()

    async def wait_held(self, timeout: float = 60.0) -> str | None:
        """Until a createRoom is held; the room the homeserver made (None: request held)."""
        await asyncio.wait_for(self._held.wait(), timeout)
        return None if self._hold_request else self.created[-1]

    async def wait_created(self, timeout: float = 60.0) -> str:
        """Until the homeserver has answered a createRoom; the room it made."""
        await asyncio.wait_for(self._created.wait(), timeout)
        return self.created[-1]

    def release(self) -> None:
        """Pass held answers on, and forward everything from now on."""
        self._hold_create = False
        self._release.set()

    def replace(self, method: str, path_end: str, status: int, body: dict[str, Any],
                times: int = 1) -> None:
        """Let the homeserver do the work, then answer ``times`` requests with this instead."""
        self.rules.append(Rule(method, path_end, status, body, True, times))

    def answer(self, method: str, path_end: str, status: int, body: dict[str, Any],
               times: int = 1) -> None:
        """Answer ``times`` requests with this, without asking the homeserver."""
        self.rules.append(Rule(method, path_end, status, body, False, times))

    # --- the proxy --------------------------------------------------------------------------

    def _rule(self, request: web.Request) -> Rule | None:
        for rule in self.rules:
            if request.method == rule.method and request.path.endswith(rule.path_end):
                rule.times -= 1
                if rule.times <= 0:
                    self.rules.remove(rule)
                return rule
        return None

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        # In a task of its own: a held request still reaches the homeserver after its client
        # (a killed bridge) has gone and aiohttp has cancelled this handler.
        data = await request.read()
        task = asyncio.create_task(self._exchange(request, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _exchange(self, request: web.Request, data: bytes) -> web.StreamResponse:
        rule = self._rule(request)
        if rule is not None and not rule.forward:
            return web.json_response(rule.body, status=rule.status)
        assert self.session is not None
        is_create = request.method == "POST" and request.path.endswith("/createRoom")
        if is_create and self._hold_create and self._hold_request:
            self._held.set()
            await self._release.wait()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self.session.request(
            request.method, self.upstream + request.path_qs, headers=headers,
            data=data,
        ) as upstream:
            body = await upstream.read()
            status = upstream.status
            content_type = upstream.headers.get("Content-Type", "application/json")
        if is_create:
            self.create_answers.append((status, body.decode(errors="replace")))
        if is_create and status == 200:
            self.created.append(str(json.loads(body)["room_id"]))
            self._created.set()
            if self._hold_create and not self._hold_request:
                self._held.set()
                await self._release.wait()
        if rule is not None:
            return web.json_response(rule.body, status=rule.status)
        return web.Response(body=body, status=status, headers={"Content-Type": content_type})
