"""Bridge-side cost of a warm message, side by side with a bare aiohttp PUT of the same send.

The homeserver is a stub in its own process that answers at once, so what is measured is the
client side: for the bridge, `DMService.send` (idempotency check, DM lookup, the PUT, the message
map insert); for the baseline, one PUT with the as_token, nothing else. Rounds alternate
between the two so drift on a shared machine hits both alike. Beside the wall-clock ratio, the
process's CPU time per message (all its threads; the stub and PostgreSQL are other processes),
which a busy machine disturbs less.

    python -m bench.warm_path [--messages 2000] [--concurrency 1 8] [--db sqlite|postgres://...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import uuid

import aiohttp

from bench.support import DB_HELP, bridge_on_stub, rate_and_cpu, statements
from dmbridge.bridge import Bridge
from tests.support.settings import AS_TOKEN

PHONE = "+15551234567"
GHOST = "@dm_sms_=2b15551234567:localhost"


async def warm_ratios(bridge: Bridge, hs_url: str, *, messages: int, concurrency: list[int],
                      rounds: int) -> list[tuple[int, float, float, float, float, float, float]]:
    """Per concurrency: bare PUT msg/s, bridge msg/s (medians of the rounds), homeserver
    requests and database statements per message, bare and bridge CPU s/message (medians)."""
    alice = "@alice:localhost"
    room_id = (await bridge.dms.send("sms", PHONE, alice, message_id="warmup",
                                     text="hi")).room_id
    run_id = uuid.uuid4().hex[:8]
    send_url = f"{hs_url}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/"
    headers = {"Authorization": f"Bearer {AS_TOKEN}", "Content-Type": "application/json"}
    results = []
    async with aiohttp.ClientSession() as session:
        async def bare(i: int) -> object:
            body = '{"msgtype": "m.text", "body": "benchmark message"}'
            async with session.put(f"{send_url}bare-{run_id}-{i}", data=body,
                                   params={"user_id": GHOST}, headers=headers) as resp:
                return (await resp.json())["event_id"]

        for conc in concurrency:
            bare_rates, bridge_rates, bare_cpu, bridge_cpu = [], [], [], []
            per_msg = stmt_per_msg = 0.0
            for r in range(rounds):
                tag = f"{run_id}-{conc}-{r}"

                async def via_bridge(i: int, tag: str = tag) -> object:
                    return await bridge.dms.send("sms", PHONE, alice, message_id=f"{tag}-{i}",
                                                 text="benchmark message")

                rate, cpu = await rate_and_cpu(messages, conc, bare)
                bare_rates.append(rate)
                bare_cpu.append(cpu)
                before, stmts = bridge.requests.total, statements(bridge)
                rate, cpu = await rate_and_cpu(messages, conc, via_bridge)
                bridge_rates.append(rate)
                bridge_cpu.append(cpu)
                per_msg = (bridge.requests.total - before) / messages
                stmt_per_msg = (statements(bridge) - stmts) / messages
            results.append((conc, statistics.median(bare_rates),
                            statistics.median(bridge_rates), per_msg, stmt_per_msg,
                            statistics.median(bare_cpu), statistics.median(bridge_cpu)))
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--db", default="sqlite",
                        help=DB_HELP)
    args = parser.parse_args()

    async with bridge_on_stub(args.db) as (bridge, hs_url, _):
        print(f"warm message cost, {args.messages} messages per round, median of "
              f"{args.rounds} rounds, database {args.db}")
        print(f"{'concurrency':>11}  {'bare PUT msg/s':>14}  {'bridge msg/s':>12}  "
              f"{'bare µs/msg':>11}  {'bridge µs/msg':>13}  {'ratio':>5}  hs req/msg  "
              "db stmt/msg  bare CPU µs  bridge CPU µs  CPU ratio")
        for conc, b, g, per_msg, stmt_per_msg, b_cpu, g_cpu in await warm_ratios(
                bridge, hs_url, messages=args.messages, concurrency=args.concurrency,
                rounds=args.rounds):
            print(f"{conc:>11}  {b:>14.0f}  {g:>12.0f}  {1e6 / b:>11.0f}  {1e6 / g:>13.0f}"
                  f"  {b / g:>5.2f}  {per_msg:>10.2f}  {stmt_per_msg:>11.2f}"
                  f"  {b_cpu * 1e6:>11.0f}  {g_cpu * 1e6:>13.0f}  {g_cpu / b_cpu:>9.2f}")


if __name__ == "__main__":
    asyncio.run(main())
