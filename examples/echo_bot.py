"""Echo bot: what a Matrix user writes to a remote user of the network comes back to them.

    DMBRIDGE_URL=http://127.0.0.1:29340 DMBRIDGE_TOKEN=... DMBRIDGE_NETWORK=chat \
        python examples/echo_bot.py

It keeps its place in the event stream in ``echo.cursor`` (or $ECHO_CURSOR): stopped and started
again, it carries on where it was, and every message is echoed once.
"""

import asyncio
import os

from dmbridge_client import Client, DirectMessage

client = Client(os.environ["DMBRIDGE_URL"], os.environ["DMBRIDGE_TOKEN"],
                os.environ.get("DMBRIDGE_NETWORK", "chat"))


@client.on_direct_message
async def echo(message: DirectMessage) -> None:
    await message.reply(message.text or "(a file)")


async def main() -> None:
    async with client:
        await client.run(cursor_file=os.environ.get("ECHO_CURSOR", "echo.cursor"))


if __name__ == "__main__":
    asyncio.run(main())
