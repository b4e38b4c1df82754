"""Cost of a Matrix user's reply on its way out, side by side with bare HTTP in the same run.

Two figures, each measured on its own against its own baseline:
- ack: acknowledging the homeserver's transaction (one message event per transaction, sent one
  at a time as Synapse does), while the bridge delivers what it acknowledged as usual: the
  bridge records the event and its outbox row durably before the 200. The baseline is a PUT to
  an endpoint that answers 200 at once.
- delivery: how fast the bridge empties a backlog of N acknowledged replies into a webhook
  receiver, timed from the moment the receiver starts answering (it held every delivery while
  the replies were acknowledged) to the moment it holds all N; no acknowledging meanwhile. The
  baseline is N signed POSTs of the same size made directly, as many at once as the bridge may
  deliver at once: with one DM one at a time (per-DM order), with 8 DMs 8 at once.

Beside them, the database statements and round trips per reply (ack and delivery together, in a
pass of their own, untimed): trips to SQLite's thread, or statements sent to PostgreSQL
(``BEGIN`` and ``COMMIT`` included). Homeserver stub and receiver run in their own processes,
so their CPU is billed to neither side.

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
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from bench.support import DB_HELP, bridge_on_stub, round_trips, spawn, statements, stop
from dmbridge import signing
from tests.support.settings import HS_TOKEN

ALICE = "@alice:localhost"
SECRET = "bench-secret-0123456789"
HELD_S = 600  # a delivery the receiver holds must not time out meanwhile
SETTLE_S = 0.3  # for the last delivered rows to be written after the receiver has them all


def _message(room_id: str, n: int, run: str) -> dict[str, Any]:
    return {"type": "m.room.message", "event_id": f"${run}-{n}", "room_id": room_id,
            "sender": ALICE, "origin_server_ts": int(time.time() * 1000),
            "content": {"msgtype": "m.text", "body": f"benchmark reply {n}"}}


async def _until(count: Callable[[], Awaitable[int]], target: int) -> None:
    while await count() < target:  # noqa: ASYNC110  (the count is in another process)
        await asyncio.sleep(0.002)


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
        async with bridge_on_stub(args.db, ping=False, quiet=logging.WARNING, networks=hook,
                                  **{"delivery.timeout": HELD_S}) as (bridge, _, port):
            concurrency = bridge.settings.delivery.concurrency
            txn_url = f"http://127.0.0.1:{port}/_matrix/app/v1/transactions/"
            headers = {"Authorization": f"Bearer {HS_TOKEN}"}
            txn = iter(range(10**9))
            async with aiohttp.ClientSession() as session:
                async def put(url: str, events: list[dict[str, Any]]) -> None:
                    async with session.put(url, json={"events": events}, headers=headers) as resp:
                        assert resp.status == 200, await resp.text()

                async def acks(url: Callable[[], str], events: list[dict[str, Any]]) -> float:
                    """Seconds per transaction, one event each, one after the other."""
                    start = time.perf_counter()
                    for event in events:
                        await put(url(), [event])
                    return (time.perf_counter() - start) / len(events)

                async def count() -> int:
                    async with session.get(f"{rx_url}/count") as resp:
                        return int((await resp.json())["count"])

                async def gate(state: str) -> None:
                    async with session.post(f"{rx_url}/gate/{state}") as resp:
                        assert resp.status == 200

                def to_bridge() -> str:
                    return f"{txn_url}{next(txn)}"

                def to_noop() -> str:
                    return f"{rx_url}/noop/{next(txn)}"

                rooms = []
                for i in range(max(args.dms)):
                    phone = f"+1555000{i:04d}"
                    sent = await bridge.dms.send("sms", phone, ALICE, message_id="hello", text="hi")
                    rooms.append(sent.room_id)
                    join = {"type": "m.room.member", "event_id": f"$join-{i}-{uuid.uuid4().hex}",
                            "room_id": sent.room_id, "sender": ALICE, "state_key": ALICE,
                            "content": {"membership": "join"}}
                    await put(to_bridge(), [join])

                print(f"reply path, {args.replies} replies per round, median of {args.rounds}"
                      f" rounds, database {args.db}, delivery concurrency {concurrency}")
                print("ratio: the bridge's ack time over the bare one; share: the bridge's "
                      "delivery rate over the bare one")
                print(f"{'DMs':>4}  {'bare ack µs':>11}  {'bridge ack µs':>13}  {'ratio':>5}  "
                      f"{'bare out/s':>10}  {'bridge out/s':>12}  {'share':>5}  "
                      f"{'stmt/reply':>10}  {'trips/reply':>11}")
                for dms in args.dms:
                    def replies(dms: int = dms) -> list[dict[str, Any]]:
                        run = uuid.uuid4().hex[:8]
                        return [_message(rooms[n % dms], n, run) for n in range(args.replies)]

                    bare_ack, bridge_ack, bare_rate, bridge_rate = [], [], [], []
                    for _ in range(args.rounds):
                        events = replies()
                        bare_ack.append(await acks(to_noop, events))

                        body = json.dumps({"id": 1, "type": "message",
                                           "message": events[0]}).encode()
                        queue = iter(range(args.replies))

                        async def post_all(queue: Any = queue, body: bytes = body) -> None:
                            for _ in queue:
                                async with session.post(f"{rx_url}/hook", data=body,
                                                        headers=signing.sign(SECRET, body)) as resp:
                                    assert resp.status == 200

                        start = time.perf_counter()
                        await asyncio.gather(*(post_all() for _ in range(min(dms, concurrency))))
                        bare_rate.append(args.replies / (time.perf_counter() - start))

                        # Ack, delivering as usual.
                        before = await count()
                        bridge_ack.append(await acks(to_bridge, events))
                        await _until(count, before + args.replies)

                        # Delivery: a backlog acknowledged while the receiver held every
                        # delivery, then let through.
                        await gate("close")
                        before = await count()
                        await acks(to_bridge, replies())
                        start = time.perf_counter()
                        await gate("open")
                        await _until(count, before + args.replies)
                        bridge_rate.append(args.replies / (time.perf_counter() - start))
                        await asyncio.sleep(SETTLE_S)

                    # Statements and round trips, counted in a pass of their own.
                    async with round_trips(bridge) as trips:
                        before, stmts, trips_before = await count(), statements(bridge), trips()
                        await acks(to_bridge, replies())
                        await _until(count, before + args.replies)
                        await asyncio.sleep(SETTLE_S)
                        per_stmt = (statements(bridge) - stmts) / args.replies
                        per_trip = (trips() - trips_before) / args.replies

                    ba, ga = statistics.median(bare_ack) * 1e6, statistics.median(bridge_ack) * 1e6
                    br, gr = statistics.median(bare_rate), statistics.median(bridge_rate)
                    print(f"{dms:>4}  {ba:>11.0f}  {ga:>13.0f}  {ga / ba:>5.2f}  {br:>10.0f}  "
                          f"{gr:>12.0f}  {gr / br:>5.2f}  {per_stmt:>10.2f}  {per_trip:>11.2f}",
                          flush=True)
    finally:
        stop(receiver)


if __name__ == "__main__":
    asyncio.run(main())
