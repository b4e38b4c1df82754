"""Echo bot with the bridge in its own process: one program runs dmbridge and the bot.

    python examples/embedded_echo_bot.py config.yaml [network]

The bot's code is examples/echo_bot.py's, unchanged; only the client comes from
``dmbridge.embedded.client_for``, whose calls and events go straight to the bridge in this
process. It keeps its place in the event stream in ``echo.cursor`` (or $ECHO_CURSOR): stopped
(SIGTERM, Ctrl-C) or killed and started again, it carries on where it was, and every message is
echoed once.
"""

import asyncio
import logging
import os
import sys

from dmbridge_client import DirectMessage

from dmbridge.bridge import Bridge
from dmbridge.config import open_config
from dmbridge.embedded import client_for


async def main(config: str, network: str) -> None:
    bridge = Bridge(open_config(config, upgrade=True))
    await bridge.start()
    try:
        async with client_for(bridge, network) as client:

            @client.on_direct_message
            async def echo(message: DirectMessage) -> None:
                await message.reply(message.text or "(a file)")

            await client.run(cursor_file=os.environ.get("ECHO_CURSOR", "echo.cursor"))
    finally:
        await bridge.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "chat"))
