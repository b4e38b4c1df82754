"""Cost of a Matrix user's reply on its way out, side by side with bare HTTP in the same run.

Two figures, each against a baseline:
- acknowledging the homeserver's transaction (one message event per transaction, sent one at a
  time as Synapse does): the bridge records the event and its outbox row durably before the 200;
  the baseline is a PUT to an endpoint that answers 200 at once.
- getting N replies to a webhook receiver: from the first transaction to the receiver holding all
  N; the baseline is N signed POSTs of the same size made directly, as many at once as the
  bridge's delivery concurrency. With one DM the bridge must go one at a time (per-DM order);
  with 8 DMs it can deliver 8 at once.

Homeserver stub and receiver run in their own processes, so their CPU is billed to neither side.

    python -m bench.reply_path [--replies 500] [--dms 1 8] [--db sqlite|postgres|postgres://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
import uuid
from typing import Any

import aiohttp

from bench.support import DB_HELP, bridge_on_stub, spawn, stop
from dmbridge import signing
from tests.support.settings import HS_TOKEN

ALICE = "@alice:localhost"
SECRET = "bench-secret-0123456789"


def _message(room_id: str, n: int, run: str) -> dict[str, Any]:
    return {"type": "m.room.message", "event_id": f"${run}-{n}", "room_id": room_id,
            "sender": ALICE, "origin_server_ts": int(time.time() * 1000),
            "content": {"msgtype": "m.text", "body": f"benchmark reply {n}"}}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replies", type=int, default=500)
    parser.add_argument("--dms", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--db", default="sqlite",
                        help=DB_HELP)
    args = parser.parse_args()

    receiver, rx_url = spawn("bench.stub_receiver")
    try:
        hook = {"sms": {"delivery": {"mode": "webhook", "url": f"{rx_url}/hook", "secret": SECRET}}}
        async with bridge_on_stub(args.db, ping=False, quiet=logging.WARNING, networks=hook) as (
                bridge, _, port):
            concurrency = bridge.settings.delivery.concurrency
            txn_url = f"http://127.0.0.1:{port}/_matrix/app/v1/transactions/"
            headers = {"Authorization": f"Bearer {HS_TOKEN}"}
            txn = iter(range(10**9))
            async with aiohttp.ClientSession() as session:
                async def put(url: str, events: list[dict[str, Any]]) -> None:
                    async with session.put(url, json={"events": events}, headers=headers) as resp:
                        assert resp.status == 200, await resp.text()

                async def count() -> int:
                    async with session.get(f"{rx_url}/count") as resp:
                        return int((await resp.json())["count"])

                rooms = []
                for i in range(max(args.dms)):
                    phone = f"+1555000{i:04d}"
                    sent = await bridge.dms.send("sms", phone, ALICE, message_id="hello", text="hi")
                    rooms.append(sent.room_id)
                    join = {"type": "m.room.member", "event_id": f"$join-{i}-{uuid.uuid4().hex}",
                            "room_id": sent.room_id, "sender": ALICE, "state_key": ALICE,
                            "content": {"membership": "join", "displayname": "Alice"}}
                    await put(f"{txn_url}{next(txn)}", [join])

                print(f"reply path, {args.replies} replies per round, median of {args.rounds}"
                      f" rounds, database {args.db}, delivery concurrency {concurrency}")
                print(f"{'DMs':>4}  {'bare ack µs':>11}  {'bridge ack µs':>13}  {'ratio':>5}  "
                      f"{'bare out/s':>10}  {'bridge out/s':>12}  {'ratio':>5}")
                for dms in args.dms:
                    bare_ack, bridge_ack, bare_rate, bridge_rate = [], [], [], []
                    for _ in range(args.rounds):
                        run = uuid.uuid4().hex[:8]
                        events = [_message(rooms[n % dms], n, run) for n in range(args.replies)]

                        start = time.perf_counter()
                        for event in events:
                            await put(f"{rx_url}/noop/{next(txn)}", [event])
                        bare_ack.append((time.perf_counter() - start) / len(events))

                        body = json.dumps({"id": 1, "type": "message",
                                           "message": events[0]}).encode()
                        queue = iter(range(args.replies))

                        async def post_all(queue: Any = queue, body: bytes = body) -> None:
                            for _ in queue:
                                async with session.post(f"{rx_url}/hook", data=body,
                                                        headers=signing.sign(SECRET, body)) as resp:
                                    assert resp.status == 200

                        before = await count()
                        start = time.perf_counter()
                        await asyncio.gather(*(post_all() for _ in range(min(dms, concurrency))))
                        bare_rate.append(args.replies / (time.perf_counter() - start))

                        before = await count()
                        start = time.perf_counter()
                        for event in events:
                            await put(f"{txn_url}{next(txn)}", [event])
                        bridge_ack.append((time.perf_counter() - start) / len(events))
                        while await count() < before + args.replies:  # noqa: ASYNC110  (another process)
                            await asyncio.sleep(0.005)
                        bridge_rate.append(args.replies / (time.perf_counter() - start))
                    ba, ga = statistics.median(bare_ack) * 1e6, statistics.median(bridge_ack) * 1e6
                    br, gr = statistics.median(bare_rate), statistics.median(bridge_rate)
                    print(f"{dms:>4}  {ba:>11.0f}  {ga:>13.0f}  {ga / ba:>5.2f}  {br:>10.0f}  "
                          f"{gr:>12.0f}  {br / gr:>5.2f}")
    finally:
        stop(receiver)


if __name__ == "__main__":
    asyncio.run(main())
