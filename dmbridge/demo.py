"""The quick-start demo: a throwaway local Synapse, the bridge on SQLite, and one DM routed in."""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import signal
from pathlib import Path

import aiohttp

from .bridge import Bridge
from .config import open_config
from .localhs import LocalSynapse, ensure_synapse, free_port

log = logging.getLogger("dmbridge.demo")

DEMO_USER = "alice"
DEMO_SENDER = "demo-contact"


def _prepare(workdir: Path) -> tuple[Path, Path]:
    """Write the demo's config and registration once; later runs reuse them (and their ports)."""
    from .__main__ import generate

    workdir.mkdir(parents=True, exist_ok=True)
    config, registration = workdir / "config.yaml", workdir / "registration.yaml"
    if not config.exists():
        hs_port, bridge_port = free_port(8008), free_port(29340)
        generate(config, registration, {
            "homeserver.address": f"http://127.0.0.1:{hs_port}",
            "homeserver.domain": "localhost",
            "appservice.address": f"http://127.0.0.1:{bridge_port}",
            "appservice.port": bridge_port,
            "database.url": "sqlite:dmbridge.db",
        })
    return config, registration


def _password(workdir: Path) -> str:
    path = workdir / "alice-password.txt"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(12))
        path.chmod(0o600)
    return path.read_text().strip()


async def run_demo(workdir: Path, *, once: bool) -> int:
    config_path, registration = await asyncio.to_thread(_prepare, workdir)
    settings = open_config(config_path)
    network = next(iter(settings.networks))
    log.info("demo folder: %s", workdir)
    python = await asyncio.to_thread(ensure_synapse)
    hs_port = int(settings.homeserver_url.rsplit(":", 1)[1])
    synapse = LocalSynapse(workdir / "synapse", server_name=settings.domain, port=hs_port,
                           registration_files=[registration], python=python)
    log.info("starting a throwaway Synapse at %s", synapse.base_url)
    await asyncio.to_thread(synapse.start)
    bridge: Bridge | None = None
    try:
        password = _password(workdir)
        user_id = await asyncio.to_thread(synapse.register_user, DEMO_USER, password)
        bridge = Bridge(settings)
        await bridge.start()
        room_id = await _send_demo_dm(settings.port, network.id, network.tokens[0], user_id)
        command = shutil.which("dmbridge") or "dmbridge"
        print(f"""
dmbridge demo {"ran" if once else "is running"}.
  homeserver:  {synapse.base_url}   (a throwaway Synapse, data in {synapse.workdir})
  log in as:   {DEMO_USER}  password: {password}
  you have:    a DM invite from "Demo Contact" ({network.id} user {DEMO_SENDER}) in {room_id}

Open a Matrix client (for example Element: sign in, edit the homeserver to {synapse.base_url}),
accept the invite, and read the message. While it runs, route another one in with:
  {command} send -c {config_path} --network {network.id} --sender {DEMO_SENDER} \\
      --to {user_id} --text 'Hello again'
""", flush=True)
        if once:
            print("--once: stopping now; run without it to keep the bridge and homeserver up.")
        else:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            print("Ctrl-C stops the bridge and the homeserver.", flush=True)
            await stop.wait()
    finally:
        if bridge is not None:
            await bridge.stop()
        await asyncio.to_thread(synapse.stop)
    return 0


async def _send_demo_dm(port: int, network_id: str, token: str, user_id: str) -> str:
    """Route the demo DM in the way a platform would: through the HTTP API."""
    url = (f"http://127.0.0.1:{port}/_dmbridge/v1/networks/{network_id}/messages/"
           f"demo-{secrets.token_hex(4)}")
    body = {"sender": DEMO_SENDER, "sender_name": "Demo Contact", "recipient": user_id,
            "text": "Hello from dmbridge! This DM was routed in through the bridge's API."}
    async with aiohttp.ClientSession() as session, session.put(
        url, json=body, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"the demo DM failed: {resp.status} {data}")
    log.info("demo DM sent: %s", data)
    return str(data["room_id"])
