"""Media through the bridge, side by side with the same bytes sent straight to the homeserver.

Upload: a platform's POST .../media (spooled to disk, size-limited, sniffed, measured, then
streamed to the homeserver and recorded) against one bare POST to the homeserver's upload.
Download: a platform's GET on a media link (signature check, then the homeserver's bytes
streamed through) against one bare GET of the homeserver's authenticated download.
The homeserver is a stub in its own process; rounds alternate between the two sides.
Peak memory: how far the process's peak RSS rose while the largest files went through the
bridge (a streamed path stays flat; a buffered one grows by the file size).

    python -m bench.media_path [--sizes 65536 1048576 16777216] [--files 20] [--db ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import time
import zlib
from collections.abc import Awaitable, Callable
from functools import partial

import aiohttp

from bench.support import DB_HELP, bridge_on_stub
from tests.support.settings import AS_TOKEN, SMS_TOKEN

MIB = 1024 * 1024
Transfer = Callable[[], Awaitable[object]]


def _payload(size: int) -> bytes:
    """A file that sniffs as a PNG: a real header, then incompressible filler."""
    head = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + (640).to_bytes(4, "big") \
        + (480).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    head += zlib.crc32(head[12:]).to_bytes(4, "big")
    return head + os.urandom(size - len(head))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _rate(files: int, size: int, one: Callable[[], Awaitable[object]]) -> float:
    """MiB per second for ``files`` transfers of ``size`` bytes, one at a time."""
    start = time.perf_counter()
    for _ in range(files):
        await one()
    return files * size / MIB / (time.perf_counter() - start)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64 * 1024, MIB, 16 * MIB])
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--db", default="sqlite", help=DB_HELP)
    args = parser.parse_args()

    async with bridge_on_stub(args.db, **{"media.max_upload_bytes": max(args.sizes)}) as (
            bridge, hs_url, port):
        api = f"http://127.0.0.1:{port}/_dmbridge/v1/networks/sms"
        hs_auth = {"Authorization": f"Bearer {AS_TOKEN}"}
        net_auth = {"Authorization": f"Bearer {SMS_TOKEN}"}
        async with aiohttp.ClientSession() as session:
            async def post(url: str, data: bytes, headers: dict[str, str]) -> str:
                async with session.post(url, data=data, headers={
                        **headers, "Content-Type": "image/png"}) as resp:
                    assert resp.status in (200, 201), await resp.text()
                    return str((await resp.json())["content_uri"])

            async def get(url: str, headers: dict[str, str], size: int) -> None:
                async with session.get(url, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                    got = 0
                    async for chunk in resp.content.iter_chunked(65536):
                        got += len(chunk)
                    assert got == size

            print(f"media cost, {args.files} files per round, median of {args.rounds} rounds,"
                  f" database {args.db}")
            print(f"{'size':>9}  {'way':>8}  {'bare MiB/s':>10}  {'bridge MiB/s':>12}  "
                  f"{'ratio':>5}")
            rss: dict[int, float] = {}
            for size in args.sizes:
                data = _payload(size)
                uri = await post(f"{api}/media", data, net_auth)
                server, media_id = uri[len("mxc://"):].split("/")
                link = bridge.links.make("sms", uri).url
                direct = f"{hs_url}/_matrix/client/v1/media/download/{server}/{media_id}"
                # Downloads first: the stub keeps only the newest uploads.
                sides: dict[str, tuple[Transfer, Transfer]] = {
                    "download": (partial(get, direct, hs_auth, size),
                                 partial(get, link, net_auth, size)),
                    "upload": (partial(post, f"{hs_url}/_matrix/media/v3/upload", data, hs_auth),
                               partial(post, f"{api}/media", data, net_auth)),
                }
                for way, (bare, through) in sides.items():
                    bare_rates, bridge_rates = [], []
                    for _ in range(args.rounds):
                        bare_rates.append(await _rate(args.files, size, bare))
                        before = _peak_rss_mib()
                        bridge_rates.append(await _rate(args.files, size, through))
                        rss[size] = max(rss.get(size, 0.0), _peak_rss_mib() - before)
                    b, g = statistics.median(bare_rates), statistics.median(bridge_rates)
                    print(f"{size:>9}  {way:>8}  {b:>10.1f}  {g:>12.1f}  {b / g:>5.2f}")
            for size, grew in rss.items():
                print(f"peak RSS rise while {size}-byte files went through the bridge:"
                      f" {grew:.1f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
