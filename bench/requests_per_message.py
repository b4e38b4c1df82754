"""Homeserver requests per inbound message, against a real Synapse on 127.0.0.1.

Lists every request of the cold path (first contact), then counts the warm path (a DM the
user has joined) over many messages. Baselines in the same run, interleaved message by message
with the bridge's: a NioBot-style client (it reads the sender's ``m.direct`` account data to
find the room, then sends: two requests), and a stateless sender that also checks the room's
joined members first, as careful client-side DM helpers do (three requests).

    python -m bench.requests_per_message [--messages 50]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp
from mautrix.types import UserID

from dmbridge.bridge import Bridge
from dmbridge.config import write_registration
from dmbridge.localhs import LocalSynapse, ensure_synapse, free_port
from tests.support.settings import AS_TOKEN, make_settings

PHONE = "+15551234567"
GHOST = "@dm_sms_=2b15551234567:localhost"
PASSWORD = "bench-password-123"



async def _join(hs_url: str, user: str, room_id: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{hs_url}/_matrix/client/v3/login", json={
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
            "password": PASSWORD}) as r:
            token = (await r.json())["access_token"]
        async with s.post(f"{hs_url}/_matrix/client/v3/join/{quote(room_id)}",
                          headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, await r.text()


async def _niobot_send(session: aiohttp.ClientSession, hs_url: str, user: str, i: int) -> int:
    """A NioBot-style client: the room from the sender's m.direct, then the send."""
    headers = {"Authorization": f"Bearer {AS_TOKEN}"}
    params = {"user_id": GHOST}
    base = f"{hs_url}/_matrix/client/v3"
    async with session.get(f"{base}/user/{quote(GHOST)}/account_data/m.direct",
                           params=params, headers=headers) as r:
        room = (await r.json())[user][0]
    async with session.put(f"{base}/rooms/{quote(room)}/send/m.room.message/niobot-{i}",
                           params=params, headers=headers,
                           json={"msgtype": "m.text", "body": f"niobot {i}"}) as r:
        assert r.status == 200
    return 2


async def _stateless_send(session: aiohttp.ClientSession, hs_url: str, room_id: str, user: str,
                          i: int) -> int:
    """The baseline: no local state, so every message asks the homeserver first."""
    headers = {"Authorization": f"Bearer {AS_TOKEN}"}
    params = {"user_id": GHOST}
    base = f"{hs_url}/_matrix/client/v3"
    async with session.get(f"{base}/user/{quote(GHOST)}/account_data/m.direct",
                           params=params, headers=headers) as r:
        room = (await r.json())[user][0]
    async with session.get(f"{base}/rooms/{quote(room)}/joined_members",
                           params=params, headers=headers) as r:
        assert user in (await r.json())["joined"]
    async with session.put(f"{base}/rooms/{quote(room)}/send/m.room.message/baseline-{i}",
                           params=params, headers=headers,
                           json={"msgtype": "m.text", "body": f"baseline {i}"}) as r:
        assert r.status == 200
    return 3


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    folder = Path(tempfile.mkdtemp(prefix="dmbridge-bench-"))
    port = free_port()
    synapse = LocalSynapse(folder / "hs", registration_files=[folder / "registration.yaml"],
                           python=ensure_synapse())
    settings = make_settings(folder / "bridge", homeserver_url=synapse.base_url,
                             domain="localhost", port=port,
                             db_url=f"sqlite:///{folder / 'bridge.db'}")
    write_registration(settings, folder / "registration.yaml")
    synapse.start()
    bridge = Bridge(settings)
    try:
        alice = synapse.register_user("alice", PASSWORD)
        await bridge.start()

        before = len(bridge.requests.recent)
        first = await bridge.dms.send("sms", PHONE, alice, message_id="cold", text="hello",
                                      sender_name="Bob")
        cold = list(bridge.requests.recent)[before:]
        print(f"cold path (first contact): {len(cold)} homeserver requests")
        for method, path in cold:
            print(f"  {method:<5} {path}")

        await _join(synapse.base_url, alice, first.room_id)
        # The bridge learns of the join from the homeserver's next transaction.
        while await bridge.stores.members.get(first.room_id, UserID(alice)) != "join":  # noqa: ASYNC110
            await asyncio.sleep(0.05)

        n = args.messages
        bridge_times, nio_times, base_times = [], [], []
        start_total = bridge.requests.total
        async with aiohttp.ClientSession() as session:
            for i in range(n):
                t = time.perf_counter()
                await bridge.dms.send("sms", PHONE, alice, message_id=f"warm-{i}",
                                      text=f"warm {i}")
                bridge_times.append(time.perf_counter() - t)
                t = time.perf_counter()
                nio_requests = await _niobot_send(session, synapse.base_url, alice, i)
                nio_times.append(time.perf_counter() - t)
                t = time.perf_counter()
                base_requests = await _stateless_send(session, synapse.base_url,
                                                      first.room_id, alice, i)
                base_times.append(time.perf_counter() - t)
        per_message = (bridge.requests.total - start_total) / n
        ours = statistics.median(bridge_times)
        print(f"\nwarm path, {n} messages to a joined DM (interleaved with the baselines):")
        print(f"  {'':<34} {'requests/msg':>12} {'median ms/msg':>14} {'vs dmbridge':>11}")
        for name, requests, times in (
                ("dmbridge", per_message, bridge_times),
                ("NioBot-style (m.direct + send)", nio_requests, nio_times),
                ("stateless (+ joined_members)", base_requests, base_times)):
            median = statistics.median(times)
            print(f"  {name:<34} {requests:>12.2f} {median * 1000:>14.1f}"
                  f" {median / ours:>11.2f}")
    finally:
        await bridge.stop()
        synapse.stop()


if __name__ == "__main__":
    asyncio.run(main())
