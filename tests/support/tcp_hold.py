"""A TCP proxy in front of PostgreSQL that can lose the answer to one statement.

Everything is forwarded as it came, until a client sends a statement whose text holds the
``trigger``: once that statement's execution has been sent on (asyncpg prepares a statement
first, then sends its execution: the client's next packet), the server's answers on that
connection are held back. The server has run the statement; the client never hears so, as
when a query is cancelled or its connection stalls. Runs in the test's own event loop, on
127.0.0.1 and a free port.
"""

from __future__ import annotations

import asyncio
import contextlib


class AnswerHoldingProxy:
    def __init__(self, host: str, port: int, trigger: bytes) -> None:
        self.upstream = (host, port)
        self.trigger = trigger
        self.held = asyncio.Event()
        self.released = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> AnswerHoldingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        self.released.set()
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def release(self) -> None:
        """Let the held answers through, and everything after them."""
        self.released.set()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
                     ) -> None:
        server_r, server_w = await asyncio.open_connection(*self.upstream)
        hold = asyncio.Event()
        to_server = asyncio.create_task(self._requests(client_r, server_w, hold))
        to_client = asyncio.create_task(self._answers(server_r, client_w, hold))
        for task in (to_server, to_client):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Either side closing closes both: a client that hangs up ends the server's session.
        await asyncio.wait({to_server, to_client}, return_when=asyncio.FIRST_COMPLETED)
        for writer in (client_w, server_w):
            writer.close()
        for task in (to_server, to_client):
            task.cancel()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        hold: asyncio.Event) -> None:
        prepared = False
        while data := await reader.read(65536):
            if prepared and not self.held.is_set():
                hold.set()  # the statement's execution goes on: its answer is lost
                self.held.set()
            prepared = prepared or self.trigger in data
            writer.write(data)
            await writer.drain()

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       hold: asyncio.Event) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if hold.is_set():
                    await self.released.wait()
                writer.write(data)
                await writer.drain()
