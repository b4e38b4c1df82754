"""Memory the bridge keeps per ghost and per room, as more and more of them are touched.

Each touch goes through the bridge's own code paths against the stub homeserver: the
homeserver's user query for a new ghost (``MatrixHandler.query_user``: the database, one
``POST /register`` through the ghost's mautrix client, the registration remembered), a DM row
for that ghost in a room of its own (written in bulk: only the database keeps it), and
the DM's user typing in that room, as homeserver transactions of typing EDUs
(``MatrixHandler.handle_transaction``).
The user never stops typing: the worst case for the typing flags.

After a warm-up of ``--warmup`` touches (every code path has run, so imports and caches of
fixed size are filled), each line gives, per window of touches, the process's resident memory
(RSS) above what it was after the warm-up, and of it the anonymous part (``RssAnon``: the
process's own memory, without the pages of files it maps, such as SQLite's memory-mapped
database, which the kernel can take back), with the sizes of the per-ghost and per-room caches;
with ``--tracemalloc``, also the Python memory allocated since the warm-up and still held
(precise, but several times slower). The same run with the caps raised out of reach (cap 0:
nothing is ever evicted, as before the caps) is the baseline; ``--baseline-touches`` makes it
shorter, since its growth is the same for every window.

    python -m bench.memory [--touches 200000] [--caps 10000 0] [--baseline-touches N]
                           [--tracemalloc] [--db sqlite|postgres|URL]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import time
import tracemalloc
from typing import Any

from bench.support import DB_HELP, bridge_on_stub
from dmbridge.bridge import Bridge
from dmbridge.db import now_ms
from dmbridge.lru import LRU
from dmbridge.networks import Network

ALICE = "@alice:localhost"
UNBOUNDED = 10**9
BATCH = 100  # touches per homeserver transaction of typing EDUs


def _caches(bridge: Bridge) -> dict[str, LRU[Any, Any]]:
    """The bridge's caches that grow with ghosts and rooms (all of them LRUs)."""
    children = bridge.appservice.intent.api.children
    registered = bridge.state_store._registered
    typing = bridge.matrix.lifecycle._typing
    assert isinstance(children, LRU) and isinstance(registered, LRU)
    return {"clients": children, "registered": registered, "typing": typing}


async def _touch(bridge: Bridge, network: Network, start: int, count: int, txn: str) -> None:
    """Ghosts ``start`` .. ``start+count-1``: each queried, given a DM, its user typing."""
    ghosts = [(f"+1{i:010d}", f"!mem{i}:localhost") for i in range(start, start + count)]
    found = await asyncio.gather(*(bridge.matrix.query_user(network.ghost_user_id(remote_id))
                                   for remote_id, _ in ghosts))
    assert all(found)
    # The DM rows only matter in the database (the typing path looks them up): one
    # statement for the batch, not the opening's claim and activation for each.
    now = now_ms()
    await bridge.db.executemany(
        "INSERT INTO dm (ghost_id, user_id, network, remote_id, state, room_id, created_at,"
        " updated_at) VALUES ($1, $2, $3, $4, 'active', $5, $6, $6)",
        [(network.ghost_user_id(remote_id), ALICE, network.id, remote_id, room_id, now)
         for remote_id, room_id in ghosts])
    edus = [{"type": "m.typing", "room_id": room_id, "content": {"user_ids": [ALICE]}}
            for _, room_id in ghosts]
    await bridge.matrix.handle_transaction(txn, [], edus, untrusted=False)
    assert len(bridge.matrix.lifecycle._typing) > 0


def _rss() -> tuple[int, int]:
    """Resident bytes: all of them, and the anonymous ones."""
    with open("/proc/self/statm") as statm:
        total = int(statm.read().split()[1]) * resource.getpagesize()
    with open("/proc/self/status") as status:
        anon = next(int(line.split()[1]) * 1024 for line in status
                    if line.startswith("RssAnon:"))
    return total, anon


def _held() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0


# touches, RSS and anonymous RSS above the warm-up, traced, cache sizes
Row = tuple[int, int, int, int, dict[str, int]]


async def run(db: str, touches: int, cap: int, warmup: int, every: int, traced: bool
              ) -> list[Row]:
    """One row per ``every`` touches."""
    rows: list[Row] = []
    async with bridge_on_stub(db, ping=False) as (bridge, _, _):
        network = bridge.settings.networks.get("sms")
        caches = _caches(bridge)
        for cache in caches.values():
            cache.maxsize = cap or UNBOUNDED
        done = 0
        while done < warmup:
            await _touch(bridge, network, done, BATCH, f"warm{done}")
            done += BATCH
        if traced:
            tracemalloc.start()
        base_held, base_rss = _held(), _rss()
        started = time.monotonic()
        while done < touches:
            await _touch(bridge, network, done, BATCH, f"txn{done}")
            done += BATCH
            if done % every == 0:
                held = _held() - base_held
                rss, anon = _rss()
                rows.append((done, rss - base_rss[0], anon - base_rss[1], held,
                             {k: len(c) for k, c in caches.items()}))
                rate = (done - warmup) / (time.monotonic() - started)
                print(f"  cap {cap or 'none'}: {done} touches, RSS +{rows[-1][1] >> 10} KiB"
                      f" (anonymous +{rows[-1][2] >> 10} KiB), traced {held >> 10} KiB,"
                      f" {rate:.0f} touches/s", flush=True)
        tracemalloc.stop()
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--touches", type=int, default=200_000)
    parser.add_argument("--caps", type=int, nargs="+", default=[10_000, 0],
                        help="cache caps to compare (0: nothing evicted, the baseline)")
    parser.add_argument("--baseline-touches", type=int,
                        help="touches for cap 0 (default: --touches)")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--every", type=int, default=10_000)
    parser.add_argument("--db", default="sqlite", help=DB_HELP)
    args = parser.parse_args()
    assert args.warmup % BATCH == 0 and args.every % BATCH == 0

    results = {cap: await run(args.db, args.baseline_touches or args.touches if not cap
                              else args.touches, cap, args.warmup, args.every, args.tracemalloc)
               for cap in args.caps}
    print(f"\nmemory above the warm-up of {args.warmup} touches, KiB; a touch: a new ghost"
          f" registered, its DM, its user typing; database {args.db}")
    width = 45 if args.tracemalloc else 35
    print(f"{'touches':>8}  " + "  ".join(
        f"{'cap ' + str(c) if c else 'no cap':>{width}}" for c in args.caps))
    print(f"{'':>8}  " + "  ".join(
        f"{'RSS':>8} {'anon':>8} {'traced ' if args.tracemalloc else ''}"
        f"{'clients/reg./typing':>17}" for _ in args.caps))
    longest = max(results.values(), key=len)
    for i, (done, *_) in enumerate(longest):
        cells = []
        for cap in args.caps:
            if i >= len(results[cap]):
                cells.append(" " * width)
                continue
            _, rss, anon, held, sizes = results[cap][i]
            traced = f"{held >> 10:>9} " if args.tracemalloc else ""
            sizes_text = f"{sizes['clients']}/{sizes['registered']}/{sizes['typing']}"
            cells.append(f"{rss >> 10:>8} {anon >> 10:>8} {traced}{sizes_text:>17}")
        print(f"{done:>8}  " + "  ".join(cells))

if __name__ == "__main__":
    asyncio.run(main())
