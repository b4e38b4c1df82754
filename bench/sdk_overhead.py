"""The SDK's cost over a bare aiohttp call: ``DM.send`` beside the same PUT written by hand.

Two servers, each a process of its own: a stub of the platform API that answers at once (what
is left is the client's own cost), and the bridge (``dmbridge run``) on a stub homeserver that
answers at once (what a platform sees). Both sides send warm messages into the same DM over one
keep-alive session; rounds alternate between them, each going first in turn, so drift on a
shared machine hits both alike. Besides the rates, the client process's CPU time per message
is printed: that is the client's own work, the server's is not in it.

    python -m bench.sdk_overhead [--messages 1000] [--concurrency 1 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import uuid
from pathlib import Path

import aiohttp
from dmbridge_client import Client

from bench.support import rate_and_cpu, spawn, stop
from dmbridge.localhs import free_port
from tests.support.process import BridgeProcess
from tests.support.settings import AS_TOKEN, SMS_TOKEN, make_settings

PHONE = "+15551234567"
ALICE = "@alice:localhost"
# The network's quotas out of the way: the bridge's pacing is not what is measured.
UNLIMITED = {"messages_per_second": 100_000, "message_burst": 1_000_000}


async def compare(base: str, *, messages: int, concurrency: list[int], rounds: int
                  ) -> list[tuple[int, float, float, float, float]]:
    url = f"{base}/_dmbridge/v1/networks/sms/messages/"
    headers = {"Authorization": f"Bearer {SMS_TOKEN}", "Content-Type": "application/json"}
    body = {"sender": PHONE, "recipient": ALICE, "text": "benchmark message"}
    results = []
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

        await bare(0)  # its connection made, as the SDK's is

        for conc in concurrency:
            bare_rates: list[float] = []
            sdk_rates: list[float] = []
            bare_cpu: list[float] = []
            sdk_cpu: list[float] = []
            for r in range(rounds):
                sides = [(bare, bare_rates, bare_cpu), (sdk, sdk_rates, sdk_cpu)]
                for one, rates, cpus in sides[::-1] if r % 2 else sides:  # each goes first
                    rate, cpu_s = await rate_and_cpu(messages, conc, one)
                    cpu = cpu_s * 1e6  # µs per message
                    rates.append(rate)
                    cpus.append(cpu)
            results.append((conc, statistics.median(bare_rates), statistics.median(sdk_rates),
                            statistics.median(bare_cpu), statistics.median(sdk_cpu)))
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    print(f"SDK send vs bare aiohttp PUT, {args.messages} messages per round, median of "
          f"{args.rounds} rounds")
    print(f"{'server':<28}  {'concurrency':>11}  {'bare msg/s':>10}  {'SDK msg/s':>9}  "
          f"{'SDK/bare time':>13}  {'bare client CPU µs/msg':>22}  {'SDK client CPU µs/msg':>21}")

    def show(server: str, rows: list[tuple[int, float, float, float, float]]) -> None:
        for conc, b, s, bc, sc in rows:
            print(f"{server:<28}  {conc:>11}  {b:>10.0f}  {s:>9.0f}  {b / s:>13.2f}  {bc:>22.0f}"
                  f"  {sc:>21.0f}")

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


if __name__ == "__main__":
    asyncio.run(main())
