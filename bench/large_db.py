"""The bridge with a large ``dm`` table: the warm ratio, a new DM and ``GET /dms?user_id=`` at
each size, side by side in one run, with the smallest size as the baseline of the larger ones.

For each database and each size, a fresh database is seeded with that many DMs in a few bulk
``INSERT ... SELECT`` statements (one per table, in one transaction): blocks of 10 ghosts and 10
users each in a DM with every other (every ghost has 10 DMs, every user 10), one DM in ten
ended, both members joined, against the stub homeserver. Then, on that database:

- warm ratio: ``bench.warm_path``'s figure (bridge send / bare aiohttp PUT) at 1 concurrent;
- new DM: a message to a pair that has no DM yet (a fresh remote ID), so a room is created and
  the ghost's ``m.direct`` written; median milliseconds;
- GET /dms?user_id=: the HTTP API's list of a seeded user's DMs; median milliseconds;
- "vs smallest": the warm ratio and the new DM's time divided by the same figure at the smallest
  size of the same database in the same run (1.00: flat).

    python -m bench.large_db [--dms 10000 100000 1000000] [--db sqlite postgres]
                             [--messages 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
import uuid

import aiohttp
import asyncpg
from mautrix.util.async_db import Connection, Database, Scheme

from bench.support import DB_HELP, bridge_on_stub
from bench.warm_path import warm_ratios
from tests.support.settings import SMS_TOKEN

# Row i of n: block b = i / 100 holds ghosts 10b..10b+9 and users 10b..10b+9, each pair once.
_SEQ = "WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < $1)"
_GHOST_NO = "(i / 100 * 10 + i / 10 % 10)"
_USER_NO = "(i / 100 * 10 + i % 10)"
SEED = [
    "INSERT INTO dm (ghost_id, user_id, network, remote_id, room_id, state, reason,"
    " created_at, updated_at) " + _SEQ +
    f" SELECT '@dm_sms_seed' || {_GHOST_NO} || ':localhost', '@seed' || {_USER_NO} ||"
    f" ':localhost', 'sms', 'seed' || {_GHOST_NO}, '!seed' || i || ':localhost',"
    " CASE WHEN i / 10 % 10 = 9 THEN 'ended' ELSE 'active' END, 'opened',"
    " 1000000000000 + i, 1000000000000 + i FROM seq",
    "INSERT INTO room_member (room_id, user_id, membership) " + _SEQ +
    f" SELECT '!seed' || i || ':localhost', '@seed' || {_USER_NO} || ':localhost', 'join'"
    " FROM seq",
    "INSERT INTO room_member (room_id, user_id, membership) " + _SEQ +
    f" SELECT '!seed' || i || ':localhost', '@dm_sms_seed' || {_GHOST_NO} || ':localhost',"
    " 'join' FROM seq",
    "INSERT INTO ghost (user_id, network, remote_id, displayname, registered) " + _SEQ +
    " SELECT '@dm_sms_seed' || i || ':localhost', 'sms', 'seed' || i, 'Seed ' || i, true"
    " FROM seq",
]
USER = "@seed5:localhost"  # a seeded user, with 10 DMs


async def seed(db: Database, dms: int) -> float:
    """Fill the empty tables with ``dms`` DMs; seconds it took."""
    start = time.perf_counter()
    conn: Connection
    async with db.acquire() as conn, conn.transaction():
        for i, statement in enumerate(SEED):
            await conn.execute(statement, dms if i < len(SEED) - 1 else (dms + 9) // 10)
    if db.scheme == Scheme.SQLITE:
        await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    else:
        await db.execute("VACUUM ANALYZE")  # as autovacuum does after a bulk load
        try:  # the load's writes out of the way of what is measured (needs a superuser)
            await db.execute("CHECKPOINT")
        except asyncpg.InsufficientPrivilegeError:
            pass
    return time.perf_counter() - start


async def _median_ms(times: int, one: object) -> float:
    assert callable(one)
    spent = []
    for i in range(times):
        start = time.perf_counter()
        await one(i)
        spent.append((time.perf_counter() - start) * 1000)
    return statistics.median(spent)


async def measure(db: str, dms: int, messages: int, rounds: int, opens: int
                  ) -> tuple[float, float, float, float, float]:
    """Seed seconds, bare and bridge µs per warm message, new DM ms, GET /dms?user_id= ms."""
    async with bridge_on_stub(db, ping=False, quiet=logging.WARNING) as (bridge, hs_url, port):
        seeded = await seed(bridge.db, dms)
        [(_, bare, via_bridge, *_)] = await warm_ratios(
            bridge, hs_url, messages=messages, concurrency=[1], rounds=rounds)
        run = uuid.uuid4().int % 900_000 + 100_000  # fresh phone numbers

        async def new_dm(i: int) -> None:
            await bridge.dms.send("sms", f"+1{run}{i:04d}", "@alice:localhost",
                                  message_id="hello", text="hi")

        new_ms = await _median_ms(opens, new_dm)
        url = f"http://127.0.0.1:{port}/_dmbridge/v1/networks/sms/dms"
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {SMS_TOKEN}"}) as session:
            async def listing(_: int) -> None:
                async with session.get(url, params={"user_id": USER}) as resp:
                    body = await resp.json()
                    assert resp.status == 200 and len(body["dms"]) == 9, body

            list_ms = await _median_ms(opens, listing)
        return seeded, 1e6 / bare, 1e6 / via_bridge, new_ms, list_ms


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dms", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="sizes of the dm table to compare, the smallest first"
                             " (default 10000 100000 1000000)")
    parser.add_argument("--db", nargs="+", default=["sqlite", "postgres"], help=DB_HELP)
    parser.add_argument("--messages", type=int, default=2000,
                        help="warm messages per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="warm rounds (default 3)")
    parser.add_argument("--opens", type=int, default=20,
                        help="new DMs and listings timed, each (default 20)")
    args = parser.parse_args()
    print(f"large dm table: warm ratio at 1 concurrent ({args.messages} messages, median of "
          f"{args.rounds} rounds), median of {args.opens} new DMs and listings")
    print(f"{'database':>10}  {'DMs':>9}  {'seed s':>6}  {'bare µs/msg':>11}  {'bridge µs/msg':>13}"
          f"  {'warm ratio':>10}  {'vs smallest':>11}  {'new DM ms':>9}  {'vs smallest':>11}"
          f"  {'GET /dms?user_id= ms':>20}")
    for db in args.db:
        smallest: tuple[float, float] | None = None
        for dms in sorted(args.dms):
            seeded, bare_us, bridge_us, new_ms, list_ms = await measure(
                db, dms, args.messages, args.rounds, args.opens)
            ratio = bridge_us / bare_us
            smallest = smallest or (ratio, new_ms)
            print(f"{db:>10}  {dms:>9}  {seeded:>6.1f}  {bare_us:>11.0f}  {bridge_us:>13.0f}"
                  f"  {ratio:>10.2f}  {ratio / smallest[0]:>11.2f}  {new_ms:>9.1f}"
                  f"  {new_ms / smallest[1]:>11.2f}  {list_ms:>20.1f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
