"""Run the tests' fake homeserver as its own process, for benchmarks: prints its URL, serves
until stdin closes."""

from __future__ import annotations

import asyncio
import sys

from tests.support.fake_homeserver import FakeHomeserver


async def main(as_token: str) -> None:
    hs = FakeHomeserver(as_token, record=False)
    hs.add_human("alice")
    await hs.start()
    print(hs.url, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await hs.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
