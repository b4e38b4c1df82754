"""A webhook receiver in its own process, for benchmarks: answers 200 at once and counts.

Prints its base URL, serves until stdin closes. POST /hook counts a delivery, PUT /noop answers
like a homeserver transaction endpoint would (the baseline), GET /count tells the count.
POST /gate/close holds every delivery unanswered until POST /gate/open (so a backlog can build
up and its delivery be timed on its own).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from bench.support import serve_until_stdin_closes


async def main() -> None:
    count = 0
    gate = asyncio.Event()
    gate.set()

    async def hook(request: web.Request) -> web.Response:
        nonlocal count
        await request.read()
        await gate.wait()
        count += 1
        return web.json_response({})

    async def noop(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({})

    async def get_count(_: web.Request) -> web.Response:
        return web.json_response({"count": count})

    async def set_gate(request: web.Request) -> web.Response:
        if request.match_info["state"] == "open":
            gate.set()
        else:
            gate.clear()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_put("/noop/{txn}", noop)
    app.router.add_get("/count", get_count)
    app.router.add_post("/gate/{state:open|close}", set_gate)
    await serve_until_stdin_closes(app)


if __name__ == "__main__":
    asyncio.run(main())
