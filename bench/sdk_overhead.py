"""The SDK's cost over a bare aiohttp call: ``DM.send`` beside the same PUT written by hand,
and beside ``DM.send`` of a client in the bridge's own process (``dmbridge.embedded``).

Three servers: a stub of the platform API that answers at once, in a process of its own (what
is left is the client's own cost); the bridge (``dmbridge run``) on a stub homeserver that
answers at once, in a process of its own (what a platform sees); and the same bridge in this
process, where the in-process client is measured too. Every side sends warm messages into the
same DM (over one keep-alive session for HTTP); rounds alternate between the sides, each going
first in turn, so drift on a shared machine hits all alike. Besides the rates, this process's
CPU time per message is printed: with the bridge in its own process that is the client's own
work; with the bridge in this process it is the client's and the bridge's together.

    python -m bench.sdk_overhead [--messages 1000] [--concurrency 1 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import statistics
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from dmbridge_client import Client

from bench.support import bridge_on_stub, rate_and_cpu, spawn, stop
from dmbridge.embedded import client_for
from dmbridge.localhs import free_port
from tests.support.process import BridgeProcess
from tests.support.settings import AS_TOKEN, SMS_TOKEN, make_settings

PHONE = "+15551234567"
ALICE = "@alice:localhost"
# The network's quotas out of the way: the bridge's pacing is not what is measured.
UNLIMITED = {"messages_per_second": 100_000, "message_burst": 1_000_000}


Row = tuple[int, dict[str, tuple[float, float]]]  # concurrency, side -> (msg/s, CPU µs/msg)


async def compare(base: str, *, messages: int, concurrency: list[int], rounds: int,
                  in_process: Client | None = None) -> list[Row]:
    url = f"{base}/_dmbridge/v1/networks/sms/messages/"
    headers = {"Authorization": f"Bearer {SMS_TOKEN}", "Content-Type": "application/json"}
    body = {"sender": PHONE, "recipient": ALICE, "text": "benchmark message"}
    results: list[Row] = []
    async with aiohttp.ClientSession() as session, Client(base, SMS_TOKEN, "sms") as client:
        dm = await client.open_dm(PHONE, ALICE)
        await dm.send("warm-up")

        async def bare(i: int) -> object:
            async with session.put(f"{url}bare-{uuid.uuid4().hex}", data=json.dumps(body),
                                   headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                return (await resp.json())["event_id"]

        async def sdk(i: int) -> object:
            return (await dm.send("benchmark message")).event_id

        sides: dict[str, Callable[[int], Awaitable[object]]] = {"bare": bare, "sdk": sdk}
        if in_process is not None:
            local = await in_process.open_dm(PHONE, ALICE)
            await local.send("warm-up")

            async def embedded(i: int) -> object:
                return (await local.send("benchmark message")).event_id

            sides["in-process"] = embedded
        await bare(0)  # its connection made, as the SDK's is

        for conc in concurrency:
            figures: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
            for r in range(rounds):
                order = list(sides)
                order = order[r % len(order):] + order[:r % len(order)]  # each goes first
                for side in order:
                    rate, cpu_s = await rate_and_cpu(messages, conc, sides[side])
                    figures[side].append((rate, cpu_s * 1e6))  # µs per message
            results.append((conc, {side: (statistics.median(r for r, _ in f),
                                          statistics.median(c for _, c in f))
                                   for side, f in figures.items()}))
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    print(f"SDK send (over HTTP, and in the bridge's process) vs bare aiohttp PUT, "
          f"{args.messages} messages per round, median of {args.rounds} rounds")
    print(f"{'server':<32}  {'concurrency':>11}  {'bare msg/s':>10}  {'SDK msg/s':>9}  "
          f"{'in-process msg/s':>16}  {'SDK/bare time':>13}  {'bare CPU µs/msg':>15}  "
          f"{'SDK CPU µs/msg':>14}  {'in-process CPU µs/msg':>21}")

    def show(server: str, rows: list[Row]) -> None:
        for conc, by_side in rows:
            (b, bc), (s, sc) = by_side["bare"], by_side["sdk"]
            i, ic = by_side.get("in-process", (None, None))
            rate = "-" if i is None else f"{i:.0f}"
            cpu = "-" if ic is None else f"{ic:.0f}"
            print(f"{server:<32}  {conc:>11}  {b:>10.0f}  {s:>9.0f}  {rate:>16}  "
                  f"{b / s:>13.2f}  {bc:>15.0f}  {sc:>14.0f}  {cpu:>21}")

    api, api_url = spawn("bench.stub_platform_api")
    try:
        show("stub API (client cost)", await compare(
            api_url, messages=args.messages, concurrency=args.concurrency, rounds=args.rounds))
    finally:
        stop(api)

    folder = Path(tempfile.mkdtemp(prefix="dmbridge-bench-"))
    stub = None
    bridge = BridgeProcess(folder / "config.yaml", folder / "bridge.log")
    started = finished = False
    try:
        stub, hs_url = spawn("bench.stub_homeserver", AS_TOKEN)
        port = free_port()
        settings = make_settings(folder, homeserver_url=hs_url, domain="localhost", port=port,
                                 db_url=f"sqlite:///{folder / 'bench.db'}",
                                 networks={"sms": {"quotas": UNLIMITED}},
                                 **{"logging.level": "WARNING"})
        del settings  # written to folder/config.yaml, which the bridge process reads
        bridge.start()
        started = True
        await bridge.wait_ready(port)
        show("bridge (SQLite, stub HS)", await compare(
            f"http://127.0.0.1:{port}", messages=args.messages, concurrency=args.concurrency,
            rounds=args.rounds))
        finished = True
    finally:
        if started:
            await bridge.terminate()
        if stub is not None:
            stop(stub)
        if finished:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"the bridge's config and log are kept in {folder}")

    async with bridge_on_stub("sqlite", ping=False, quiet=logging.WARNING,
                              networks={"sms": {"quotas": UNLIMITED}}) as (embedded, _, port):
        async with client_for(embedded, "sms") as in_process:
            show("bridge in this process (SQLite)", await compare(
                f"http://127.0.0.1:{port}", messages=args.messages,
                concurrency=args.concurrency, rounds=args.rounds, in_process=in_process))


if __name__ == "__main__":
    asyncio.run(main())
