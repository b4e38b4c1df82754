"""The quick-start demo: a throwaway local Synapse, the bridge on SQLite, and one DM routed in."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
from pathlib import Path

import aiohttp

from .bridge import Bridge
from .config import open_config
from .localhs import LocalSynapse, ensure_synapse, free_port
from .startup import StartupError

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


def _check_port(port: int, what: str, config: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers bind: a port whose last connections are closing is free, not taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            raise StartupError(
                f"port {port} on 127.0.0.1 ({what}) is taken ({e.strerror}): is the demo "
                f"already running? Stop it (Ctrl-C), stop what holds the port, or delete "
                f"{config} so that the demo chooses new ports") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def dmbridge_command() -> str:
    """How to run this dmbridge from any folder: `dmbridge` when the shell finds this one,
    else its full path (e.g. .venv/bin/dmbridge, which is not on the PATH)."""
    beside = Path(sys.executable).parent / "dmbridge"
    on_path = shutil.which("dmbridge")
    if beside.exists():
        if on_path and os.path.samefile(on_path, beside):
            return "dmbridge"
        return shlex.quote(str(beside.absolute()))
    if on_path:
        return "dmbridge"
    return f"{shlex.quote(sys.executable)} -m dmbridge"


async def run_demo(workdir: Path, *, once: bool) -> int:
    config_path, registration = await asyncio.to_thread(_prepare, workdir)
    settings = open_config(config_path)
    network = next(iter(settings.networks))
    log.info("demo folder: %s", workdir)
    hs_port = int(settings.homeserver_url.rsplit(":", 1)[1])
    _check_port(hs_port, "the demo's homeserver", config_path)
    _check_port(settings.port, "the demo's bridge", config_path)
    try:
        python = await asyncio.to_thread(ensure_synapse)
    except (RuntimeError, OSError) as e:
        log.debug("%s", e)
        raise StartupError(f"the demo could not install Synapse: {_first_line(e)}") from None
    synapse = LocalSynapse(workdir / "synapse", server_name=settings.domain, port=hs_port,
                           registration_files=[registration], python=python)
    log.info("starting a throwaway Synapse at %s", synapse.base_url)
    try:
        await asyncio.to_thread(synapse.start)
    except RuntimeError as e:
        log.debug("%s", e)
        raise StartupError(f"the demo's homeserver did not start; its log: "
                           f"{synapse.stdout_log}") from None
    bridge: Bridge | None = None
    try:
        password = _password(workdir)
        try:
            user_id = await asyncio.to_thread(synapse.register_user, DEMO_USER, password)
        except RuntimeError as e:
            raise StartupError(f"the demo could not create {DEMO_USER}: {_first_line(e)}; "
                               f"the homeserver's log: {synapse.log_file}") from None
        bridge = Bridge(settings)
        await bridge.start()
        room_id = await _send_demo_dm(settings.port, network.id, network.tokens[0], user_id)
        print(_instructions(settings.port, network.id, network.tokens[0], user_id, room_id,
                            password, synapse, config_path, once=once), flush=True)
        if not once:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    finally:
        if bridge is not None:
            await bridge.stop()
        await asyncio.to_thread(synapse.stop)
    return 0


def _instructions(port: int, network_id: str, token: str, user_id: str, room_id: str,
                  password: str, synapse: LocalSynapse, config_path: Path, *, once: bool
                  ) -> str:
    """What a newcomer does next; every command runs as printed, from any folder."""
    q = shlex.quote
    send = (f"{dmbridge_command()} send -c {q(str(config_path))} --network {network_id} "
            f"--sender {DEMO_SENDER} --to {q(user_id)} --text 'Hello again'")
    events = (f"curl -s -H 'Authorization: Bearer {token}' "
              f"'http://127.0.0.1:{port}/_dmbridge/v1/networks/{network_id}/events?wait=0'")
    if once:
        when = ("--once: the bridge and the homeserver are stopped now; run the demo again "
                "without --once\nto keep them up. Then route another message in with:")
        stop = ""
    else:
        when = "While the demo runs, route another message in with:"
        stop = "\nCtrl-C stops the bridge and the homeserver.\n"
    return f"""
dmbridge demo {"ran" if once else "is running"}.
  homeserver:  {synapse.base_url}   (a throwaway Synapse, data in {synapse.workdir})
  log in as:   {DEMO_USER}  password: {password}
  you have:    a DM invite from "Demo Contact" ({network_id} user {DEMO_SENDER}) in {room_id}

Open a Matrix client (for example Element: sign in, edit the homeserver to {synapse.base_url}),
accept the invite, and read the message.

{when}
  {send}
and read what alice answers, as the contact's platform does (the pull API):
  {events}
{stop}"""


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
            raise StartupError(f"the demo DM failed: {resp.status} {data}")
    log.info("demo DM sent: %s", data)
    return str(data["room_id"])
