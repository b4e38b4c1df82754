"""What the benchmarks share: helper processes, and the database to run on."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from dmbridge.bridge import Bridge
from dmbridge.db.sqlite import OneTripConnection, Run
from dmbridge.localhs import free_port
from tests.support.postgres import PostgresCluster
from tests.support.settings import AS_TOKEN, make_settings

DB_HELP = "sqlite, postgres (a private throwaway cluster), or a postgres:// URL"


async def rate_and_cpu(n: int, concurrency: int, one: Callable[[int], Awaitable[object]]
                       ) -> tuple[float, float]:
    """Messages per second for n messages with `concurrency` in flight, and this process's CPU
    seconds per message."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await one(i)

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n


async def serve_until_stdin_closes(app: web.Application) -> None:
    """Serve ``app`` on a free port of 127.0.0.1, print its base URL, and stop when stdin
    closes (the benchmark that spawned this process has ended)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"http://127.0.0.1:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


def statements(bridge: Bridge) -> int:
    """Database statements the bridge has run so far (from its own metrics)."""
    return int(sum(sample.value for metric in bridge.metrics.db_duration.collect()
                   for sample in metric.samples if sample.name.endswith("_count")))


@asynccontextmanager
async def round_trips(bridge: Bridge) -> AsyncIterator[Callable[[], int]]:
    """Counts the database round trips the bridge makes inside the block.

    On SQLite, the statements' trips to aiosqlite's worker thread (a statement run on the
    event loop makes none); on PostgreSQL, the statements sent to the server (each waits for
    its answer), ``BEGIN`` and ``COMMIT`` included. Counting costs a little time, so the
    figures timed elsewhere are timed without it.
    """
    count = 0

    def counted(*_: Any) -> None:
        nonlocal count
        count += 1

    db = bridge.stores.db
    pool = getattr(db, "pool", None)
    if pool is None:  # SQLite: every trip to the thread goes through one method
        original = OneTripConnection._on_thread

        async def on_thread(self: OneTripConnection, run: Run, query: str,
                            args: tuple[Any, ...]) -> Any:
            counted()
            return await original(self, run, query, args)

        OneTripConnection._on_thread = on_thread  # type: ignore[method-assign]
        try:
            yield lambda: count
        finally:
            OneTripConnection._on_thread = original  # type: ignore[method-assign]
        return
    # PostgreSQL: asyncpg tells a query logger of every statement; each of the pool's
    # connections (all opened here; they stay open for a benchmark's length) gets one.
    async def every_connection(act: Callable[[Any], None]) -> None:
        conns = [await pool.acquire() for _ in range(pool.get_max_size())]
        for conn in conns:
            act(conn)
            await pool.release(conn)

    await every_connection(lambda conn: conn.add_query_logger(counted))
    try:
        yield lambda: count
    finally:
        await every_connection(lambda conn: conn.remove_query_logger(counted))


def spawn(module: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m module``, which prints its URL first and serves until stdin closes.

    In its own process, its CPU is billed to neither side of a comparison.
    """
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


def database(choice: str, folder: Path) -> tuple[str, PostgresCluster | None]:
    """The database URL for ``--db`` (and the throwaway cluster to stop, if one was started)."""
    if choice == "sqlite":
        return f"sqlite:///{folder / 'bench.db'}", None
    if choice == "postgres":
        cluster = PostgresCluster(folder / "pg")
        cluster.start()
        return cluster.create_database("bench"), cluster
    return choice, None


@asynccontextmanager
async def bridge_on_stub(db: str, *, ping: bool = True, quiet: int = logging.INFO,
                         networks: dict[str, dict[str, Any]] | None = None,
                         **overrides: Any) -> AsyncIterator[tuple[Bridge, str, int]]:
    """A bridge on the stub homeserver (its own process) and the ``--db`` database.

    Yields the bridge, the homeserver's URL and the bridge's port; stops all three after.
    """
    stub, hs_url = spawn("bench.stub_homeserver", AS_TOKEN)
    folder = Path(tempfile.mkdtemp(prefix="dmbridge-bench-"))
    db_url, cluster = database(db, folder)
    port = free_port()
    settings = make_settings(folder, homeserver_url=hs_url, domain="localhost", port=port,
                             db_url=db_url, networks=networks, **overrides)
    bridge = Bridge(settings)
    logging.disable(quiet)
    try:
        await bridge.start(ping=ping)
        yield bridge, hs_url, port
    finally:
        await bridge.stop()
        stop(stub)
        if cluster is not None:
            cluster.stop()
