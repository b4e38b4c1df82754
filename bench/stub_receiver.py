"""A webhook receiver in its own process, for benchmarks: answers 200 at once and counts.

Prints its base URL, serves until stdin closes. POST /hook counts a delivery, PUT /noop answers
like a homeserver transaction endpoint would (the baseline), GET /count tells the count.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from dmbridge.localhs import free_port


async def main() -> None:
    count = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal count
        await request.read()
        count += 1
        return web.json_response({})

    async def noop(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({})

    async def get_count(_: web.Request) -> web.Response:
        return web.json_response({"count": count})

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_put("/noop/{txn}", noop)
    app.router.add_get("/count", get_count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"http://127.0.0.1:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
