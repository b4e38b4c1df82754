"""Cost of a warm message into an encrypted DM, side by side with the same into a plain DM.

One bridge (``dm.encryption: allow``) on the stub homeserver, two DMs of one user: one room the
bridge treats as encrypted, one plain; and first, as the baseline, the plain DM on a bridge with
``dm.encryption: off`` (what turning encryption on costs a plain DM). Each bridge sends one
untimed round per DM first. The first encrypted send makes the ghost's device and shares the
room key (a key query, a one-time key claim and a to-device message); after that a send is one
request, the PUT of the encrypted event, until the room key is rotated (every 100
messages by default: one to-device message more). Rounds alternate between the two DMs.
Figures per message: wall-clock rate, homeserver requests, to-device requests, database
statements, this process's CPU time.

    python -m bench.encrypted_path [--messages 1000] [--rounds 3] [--db sqlite|postgres|URL]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import uuid
from typing import Any

from bench.support import DB_HELP, bridge_on_stub, rate_and_cpu, statements
from dmbridge.bridge import Bridge
from dmbridge.db import now_ms
from dmbridge.encryption import ENCRYPTION_CONTENT

ALICE = "@alice:localhost"
PLAIN, ENCRYPTED = "+15551230001", "+15551230002"


async def compare(bridge: Bridge, kinds: dict[str, str], *, messages: int, concurrency: int,
                  rounds: int) -> dict[str, tuple[float, float, float, float, float]]:
    """Per DM kind (name: remote ID): msg/s and CPU s/msg (medians), hs requests, to-device
    requests and db statements per message (all rounds)."""
    for remote_id in kinds.values():
        warm = await bridge.dms.send("sms", remote_id, ALICE, message_id="warm", text="hi")
        if remote_id == ENCRYPTED:
            await bridge.stores.encrypted_rooms.record(None, warm.room_id, ENCRYPTION_CONTENT,
                                                       now_ms())
            # The first encrypted send: the device is made and the room key shared (not timed).
            before = bridge.requests.total
            await bridge.dms.send("sms", ENCRYPTED, ALICE, message_id="first", text="hi")
            print(f"first encrypted send (device made, key shared): "
                  f"{bridge.requests.total - before} homeserver requests")
    run = uuid.uuid4().hex[:8]
    for remote_id in kinds.values():  # warm-up, untimed: the same work on every bridge

        async def warm_up(i: int, remote_id: str = remote_id) -> object:
            return await bridge.dms.send("sms", remote_id, ALICE,
                                         message_id=f"{run}-warm-{i}", text="benchmark message")
        await rate_and_cpu(messages, concurrency, warm_up)
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    cpus: dict[str, list[float]] = {kind: [] for kind in kinds}
    requests = dict.fromkeys(kinds, 0)
    to_device = dict.fromkeys(kinds, 0)
    stmts = dict.fromkeys(kinds, 0)
    for r in range(rounds):
        for kind, remote_id in kinds.items():
            async def one(i: int, tag: str = f"{run}-{kind}-{r}",
                          remote_id: str = remote_id) -> object:
                return await bridge.dms.send("sms", remote_id, ALICE, message_id=f"{tag}-{i}",
                                             text="benchmark message")
            req, td = bridge.requests.total, _to_device(bridge)
            st = statements(bridge)
            rate, cpu = await rate_and_cpu(messages, concurrency, one)
            rates[kind].append(rate)
            cpus[kind].append(cpu)
            requests[kind] += bridge.requests.total - req
            to_device[kind] += _to_device(bridge) - td
            stmts[kind] += statements(bridge) - st
    total = messages * rounds
    return {kind: (statistics.median(rates[kind]), statistics.median(cpus[kind]),
                   requests[kind] / total, to_device[kind] / total, stmts[kind] / total)
            for kind in rates}


def _to_device(bridge: Bridge) -> int:
    return sum(n for endpoint, n in bridge.requests.by_endpoint.items()
               if "sendToDevice" in endpoint)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--db", default="sqlite", help=DB_HELP)
    args = parser.parse_args()
    results: dict[str, tuple[float, float, float, float, float]] = {}
    # Baseline first: the same plain send on a bridge with encryption off.
    off: dict[str, Any] = {"dm.encryption": "off"}
    async with bridge_on_stub(args.db, **off) as (bridge, _, _port):
        baseline = await compare(bridge, {"plain": PLAIN}, messages=args.messages,
                                 concurrency=args.concurrency, rounds=args.rounds)
        results["plain, off"] = baseline["plain"]
    allow: dict[str, Any] = {"dm.encryption": "allow"}
    async with bridge_on_stub(args.db, **allow) as (bridge, _, _port):
        both = await compare(bridge, {"plain": PLAIN, "encrypted": ENCRYPTED},
                             messages=args.messages, concurrency=args.concurrency,
                             rounds=args.rounds)
        results["plain"], results["encrypted"] = both["plain"], both["encrypted"]
    print(f"warm send, {args.messages} messages per round, median of {args.rounds} rounds, "
          f"concurrency {args.concurrency}, database {args.db}")
    print(f"{'DM':>10}  {'msg/s':>7}  {'µs/msg':>7}  {'CPU µs/msg':>10}  hs req/msg  "
          "to-device/msg  db stmt/msg")
    for kind, (rate, cpu, req, td, st) in results.items():
        print(f"{kind:>10}  {rate:>7.0f}  {1e6 / rate:>7.0f}  {cpu * 1e6:>10.0f}  {req:>10.3f}"
              f"  {td:>13.3f}  {st:>11.2f}")
    off_, plain, enc = results["plain, off"], results["plain"], results["encrypted"]
    print(f"encrypted / plain: time {plain[0] / enc[0]:.2f}x, CPU {enc[1] / plain[1]:.2f}x")
    print(f"plain with allow / plain with off: time {off_[0] / plain[0]:.2f}x,"
          f" CPU {plain[1] / off_[1]:.2f}x, db stmt/msg {plain[4]:.2f} vs {off_[4]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
