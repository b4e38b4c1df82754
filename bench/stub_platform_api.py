"""The platform API's send and open, answered at once by a process of its own, for benchmarks.

Prints its base URL, serves until stdin closes. What a client spends on a call against it is
the client's own cost: nothing waits on a database or a homeserver.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from bench.support import serve_until_stdin_closes

DM = {"room_id": "!stub", "network": "sms", "remote_id": "+15551234567",
      "ghost_id": "@dm_sms_=2b15551234567:localhost", "user_id": "@alice:localhost",
      "user_membership": "join", "state": "active", "created": False}


async def main() -> None:
    async def send(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"room_id": "!stub", "event_id": "$stub",
                                  "room_created": False, "duplicate": False})

    async def open_dm(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(DM)

    app = web.Application()
    app.router.add_put("/_dmbridge/v1/networks/{network}/messages/{message_id}", send)
    app.router.add_post("/_dmbridge/v1/networks/{network}/dms", open_dm)
    await serve_until_stdin_closes(app)


if __name__ == "__main__":
    asyncio.run(main())
