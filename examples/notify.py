"""One-shot notification: tell Matrix users something from a remote sender, once each.

    DMBRIDGE_URL=http://127.0.0.1:29340 DMBRIDGE_TOKEN=... python examples/notify.py \
        --network sms --sender +15551234567 --name 'Parcel Service' \
        --text 'Your parcel has arrived.' @alice:example.org @bob:example.org

A user who declined DMs from this sender, or whom the network may not write to, is skipped and
listed: reach them another way, and do not write to them again until they write first. The exit
status is 0 when everyone got the message, 1 when someone was skipped or a send failed.

Run it again after a failure: each user's message ID is derived from the sender, the user, the
text (and --key), so who got the message already does not get it twice. To send the same text
again as a new notification, give a new --key (a date, an order number).
"""

import argparse
import asyncio
import hashlib
import os
import sys

from dmbridge_client import (
    Client,
    Declined,
    DmbridgeError,
    NotPermitted,
    RecipientUnreachable,
    UnknownRecipient,
)


def message_id(sender: str, user_id: str, text: str, key: str) -> str:
    """The same for every run that notifies this user of this text: a repeat posts nothing."""
    parts = "\0".join((sender, user_id, text, key)).encode()
    return "notify-" + hashlib.sha256(parts).hexdigest()[:40]


async def notify(client: Client, sender: str, name: str | None, text: str,
                 users: list[str], key: str = "") -> int:
    failed = 0
    for user_id in users:
        try:
            sent = await client.send_message(sender, user_id, text, name=name,
                                             message_id=message_id(sender, user_id, text, key))
        except (Declined, NotPermitted, UnknownRecipient, RecipientUnreachable) as e:
            failed += 1
            print(f"skipped {user_id}: {e.error} (fall back to another channel)", file=sys.stderr)
        except DmbridgeError as e:  # the bridge refused or could not be reached: run again
            failed += 1
            print(f"failed {user_id}: {e}", file=sys.stderr)
        else:
            print(f"sent to {user_id} in {sent.room_id}")
    return 1 if failed else 0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default=os.environ.get("DMBRIDGE_NETWORK", "sms"))
    parser.add_argument("--sender", required=True)
    parser.add_argument("--name")
    parser.add_argument("--text", required=True)
    parser.add_argument("--key", default="",
                        help="makes a notification with the same text a new one")
    parser.add_argument("users", nargs="+")
    args = parser.parse_args()
    async with Client(os.environ["DMBRIDGE_URL"], os.environ["DMBRIDGE_TOKEN"],
                      args.network) as client:
        return await notify(client, args.sender, args.name, args.text, args.users,
                            args.key)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
