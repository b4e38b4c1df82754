"""Several `dmbridge run` workers on one PostgreSQL database behind nginx, against the stub
homeserver: messages per second and CPU per message with 1, 2 and 3 workers, side by side.

nginx runs contrib/nginx/dmbridge.conf (as the workers' integration test does); the platform's
warm sends (each pair's DM is made first) go through it, `concurrency` at a time. CPU per
message is the user + system time of the worker processes over the measured sends (from
/proc/<pid>/stat), nginx's shown beside it; each worker count gets a fresh database, and the
figure is the median of the rounds. The load comes from this process, on the same machine.

    python -m bench.workers [--workers 1 2 3] [--messages 2000] [--concurrency 16]
                            [--pairs 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp

from bench.support import spawn, stop
from dmbridge.localhs import free_port
from tests.support.nginx import NGINX, Nginx
from tests.support.postgres import PostgresCluster
from tests.support.process import BridgeProcess
from tests.support.settings import AS_TOKEN, SMS_TOKEN, make_settings

RECIPIENT = "@alice:localhost"  # the stub's one human
TICKS = os.sysconf("SC_CLK_TCK")
# Neither the platform's quota nor the pace of room creation is what is measured here.
UNLIMITED = {"sms": {"quotas": {"messages_per_second": 0, "new_dms_per_hour": 0}}}
PACE = {"rate_limits.room_creation": {"per_second": 1000, "burst": 1000}}
IDLE_S = 3.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15)


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


async def counted(session: aiohttp.ClientSession, ports: list[int]) -> tuple[float, float]:
    """Database statements and homeserver requests so far, summed over the workers (read from
    each worker's /metrics, not through the balancer)."""
    statements = requests = 0.0
    for port in ports:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith("dmbridge_db_query_duration_seconds_count"):
                statements += float(line.rsplit(" ", 1)[1])
            elif line.startswith("dmbridge_homeserver_requests_total"):
                requests += float(line.rsplit(" ", 1)[1])
    return statements, requests


def senders(pairs: int) -> list[str]:
    return [f"+1555{n:07d}" for n in range(pairs)]


async def send_all(session: aiohttp.ClientSession, base: str, ids: list[tuple[str, str]],
                   concurrency: int) -> float:
    """PUT each (message ID, sender) through the balancer; the seconds it took. Each DM's
    messages are sent one after the other, in order, as a platform keeping their order would;
    ``concurrency`` DMs at a time."""
    lanes: dict[str, list[tuple[str, str]]] = {}
    for message_id, sender in ids:
        lanes.setdefault(sender, []).append((message_id, sender))
    slots = [[m for k, lane in enumerate(lanes.values()) if k % concurrency == j for m in lane]
             for j in range(concurrency)]

    async def one_at_a_time(slot: list[tuple[str, str]]) -> None:
        for message_id, sender in slot:
            async with session.put(
                f"{base}/_dmbridge/v1/networks/sms/messages/{message_id}",
                json={"sender": sender, "recipient": RECIPIENT, "text": "benchmark message"},
                headers={"Authorization": f"Bearer {SMS_TOKEN}"},
            ) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{message_id}: {resp.status} {await resp.text()}")

    started = time.perf_counter()
    await asyncio.gather(*(one_at_a_time(slot) for slot in slots))
    return time.perf_counter() - started


async def measure(cluster: PostgresCluster, hs_url: str, folder: Path, workers: int,
                  args: argparse.Namespace) -> tuple[float, float, float, float, float, float]:
    """Median msg/s, worker CPU ms per message and nginx CPU ms per message; the workers' CPU
    ms per second while idle (their background work, counted in CPU per message too); database
    statements and homeserver requests per message."""
    db_url = cluster.create_database(f"bench_{workers}_{uuid.uuid4().hex[:6]}")
    ports = [free_port() for _ in range(workers)]
    balancer = Nginx(folder / f"nginx{workers}", free_port(), ports)
    processes = []
    for i, port in enumerate(ports):
        place = folder / f"w{workers}-{i}"
        make_settings(place, homeserver_url=hs_url, domain="localhost", port=port,
                      db_url=db_url, networks=UNLIMITED,
                      **{"appservice.address": balancer.url, "logging.level": "INFO", **PACE})
        processes.append(BridgeProcess(place / "config.yaml", place / "bridge.log"))
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(balancer)
        for process in processes:
            await stack.enter_async_context(process)
        await balancer.start()
        for process in processes:
            process.start()
        for process, port in zip(processes, ports, strict=True):
            await process.wait_ready(port)
        assert balancer.pid is not None
        nginx_pids = [balancer.pid, *children(balancer.pid)]
        worker_pids = [p.pid for p in processes if p.pid is not None]
        session = await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.concurrency)))
        who = senders(args.pairs)
        await send_all(session, balancer.url, [(f"open-{s}", s) for s in who], args.concurrency)
        before_idle = sum(map(cpu_seconds, worker_pids))
        await asyncio.sleep(IDLE_S)
        idle = (sum(map(cpu_seconds, worker_pids)) - before_idle) * 1000 / IDLE_S
        rates, worker_cpu, nginx_cpu = [], [], []
        counts_before = await counted(session, ports)
        for r in range(args.rounds):
            ids = [(f"r{r}-{n}", who[n % len(who)]) for n in range(args.messages)]
            before = sum(map(cpu_seconds, worker_pids)), sum(map(cpu_seconds, nginx_pids))
            took = await send_all(session, balancer.url, ids, args.concurrency)
            after = sum(map(cpu_seconds, worker_pids)), sum(map(cpu_seconds, nginx_pids))
            rates.append(args.messages / took)
            worker_cpu.append((after[0] - before[0]) * 1000 / args.messages)
            nginx_cpu.append((after[1] - before[1]) * 1000 / args.messages)
        counts_after = await counted(session, ports)
        sent = args.messages * args.rounds
        per_message = [(b - a) / sent for a, b in zip(counts_before, counts_after, strict=True)]
        for process in processes:
            await process.terminate()
    return (statistics.median(rates), statistics.median(worker_cpu),
            statistics.median(nginx_cpu), idle, *per_message)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not NGINX.is_file():
        raise SystemExit(f"nginx is not installed ({NGINX}; apt-get install nginx)")
    folder = Path(tempfile.mkdtemp(prefix="dmbridge-bench-workers-"))
    try:
        stub, hs_url = spawn("bench.stub_homeserver", AS_TOKEN)
        cluster = PostgresCluster(folder / "pg")
        try:
            cluster.start()
            results = [(n, *await measure(cluster, hs_url, folder, n, args))
                       for n in args.workers]
        finally:
            cluster.stop()
            stop(stub)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"workers on PostgreSQL behind nginx, stub homeserver; {args.messages} warm messages "
          f"per round over {args.pairs} DMs, {args.concurrency} in flight, median of "
          f"{args.rounds} rounds; {os.cpu_count()} CPUs")
    print(f"{'workers':>7}  {'msg/s':>7}  {'vs 1':>5}  {'worker CPU ms/msg':>17}  "
          f"{'vs 1':>5}  {'nginx CPU ms/msg':>16}  {'idle worker CPU ms/s':>20}  "
          "db stmt/msg  hs req/msg")
    first_rate, first_cpu = results[0][1], results[0][2]
    for n, rate, worker_ms, nginx_ms, idle, statements, requests in results:
        print(f"{n:>7}  {rate:>7.0f}  {rate / first_rate:>5.2f}  {worker_ms:>17.2f}  "
              f"{worker_ms / first_cpu:>5.2f}  {nginx_ms:>16.2f}  {idle:>20.1f}  "
              f"{statements:>11.2f}  {requests:>10.2f}")


if __name__ == "__main__":
    asyncio.run(main())
