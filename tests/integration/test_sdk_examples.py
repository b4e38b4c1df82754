"""The SDK's examples, run as a platform's developer runs them, against a running bridge."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from dmbridge_client import Client

from dmbridge.bridge import Bridge
from tests.integration.conftest import Homeserver, accept_dm, bridge_sees, wait_for
from tests.support.matrix import Human
from tests.support.settings import CHAT_TOKEN, SMS_TOKEN

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class Program:
    """An example as a subprocess, its output in a log file; started again after a stop."""

    def __init__(self, script: str, env: dict[str, str], folder: Path) -> None:
        self.script = EXAMPLES / script
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self.folder = folder
        self.log = folder / f"{self.script.stem}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *args: str) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(self.script), *args, cwd=self.folder, env=self.env,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)

    async def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)  # by pid, the process this test started
        return await asyncio.wait_for(self.proc.wait(), 30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _echoes(messages: list[dict[str, Any]], ghost: str) -> list[str]:
    """The ghost's messages as the human sees them, the quoted fallback of a reply left out."""
    return [m["content"]["body"].split("\n\n")[-1] for m in messages if m["sender"] == ghost]


async def test_echo_bot_answers_in_the_dm_and_survives_restarts(
    bridge: Bridge, homeserver: Homeserver, new_human: Any, tmp_path: Path
) -> None:
    """The human writes, the echo comes back in the same DM; the bot is stopped (SIGTERM) and
    killed (SIGKILL) between messages, and every message is echoed exactly once."""
    human: Human = await new_human()
    contact = f"echo{uuid.uuid4().hex[:8]}"
    ghost = bridge.settings.networks.get("chat").ghost_user_id(contact)
    async with Client(f"http://127.0.0.1:{homeserver.bridge_port}", CHAT_TOKEN, "chat") as c:
        first = await c.send_message(contact, human.user_id, "Write to me")
    room_id = first.room_id
    await accept_dm(human, room_id, bridge)
    bot = Program("echo_bot.py", {"DMBRIDGE_URL": f"http://127.0.0.1:{homeserver.bridge_port}",
                                  "DMBRIDGE_TOKEN": CHAT_TOKEN, "DMBRIDGE_NETWORK": "chat",
                                  "ECHO_CURSOR": str(tmp_path / "echo.cursor")}, tmp_path)

    async def echoed(text: str) -> None:
        async def seen() -> bool:
            return text in _echoes(await human.messages(room_id), ghost)
        await wait_for(seen, timeout=60, what=f"the echo of {text!r}:\n{bot.output()}")

    await bot.start()
    await human.say(room_id, "one")
    await echoed("one")
    assert await bot.stop(signal.SIGTERM) == 0, bot.output()

    await human.say(room_id, "two")  # while the bot is stopped
    await bot.start()
    await echoed("two")
    assert await bot.stop(signal.SIGKILL) == -signal.SIGKILL

    await human.say(room_id, "three")  # while the bot is dead
    await bot.start()
    await echoed("three")
    assert await bot.stop(signal.SIGTERM) == 0, bot.output()

    messages = await human.messages(room_id)
    assert _echoes(messages, ghost) == ["Write to me", "one", "two", "three"]
    assert {m["content"]["m.relates_to"]["m.in_reply_to"]["event_id"]
            for m in messages if m["sender"] == ghost and "m.relates_to" in m["content"]} == {
        m["event_id"] for m in messages if m["sender"] == human.user_id}
    assert int((tmp_path / "echo.cursor").read_text()) > 0


async def test_notify_sends_to_who_accepts_and_skips_who_declined(
    bridge: Bridge, homeserver: Homeserver, new_human: Any, tmp_path: Path
) -> None:
    """examples/notify.py: the user who rejected the sender is skipped with what to do, the
    other gets the message, and the exit status says someone was skipped."""
    willing: Human = await new_human()
    unwilling: Human = await new_human()
    sender = "+1555" + str(uuid.uuid4().int)[:7]
    async with Client(f"http://127.0.0.1:{homeserver.bridge_port}", SMS_TOKEN, "sms") as c:
        dm = await c.open_dm(sender, unwilling.user_id)
    await unwilling.wait_invite(dm.room_id)
    await unwilling.reject(dm.room_id)
    await bridge_sees(bridge, dm.room_id, unwilling.user_id, "leave")

    notify = Program("notify.py", {"DMBRIDGE_URL": f"http://127.0.0.1:{homeserver.bridge_port}",
                                   "DMBRIDGE_TOKEN": SMS_TOKEN}, tmp_path)
    await notify.start("--network", "sms", "--sender", sender, "--name", "Parcel Service",
                       "--text", "Your parcel has arrived.", unwilling.user_id, willing.user_id)
    assert notify.proc is not None
    assert await asyncio.wait_for(notify.proc.wait(), 60) == 1, notify.output()
    lines = notify.output().splitlines()
    assert any(line.startswith(f"skipped {unwilling.user_id}: ") and "fall back" in line
               for line in lines), lines
    sent = [line for line in lines if line.startswith(f"sent to {willing.user_id} in !")]
    assert len(sent) == 1, lines
    room_id = sent[0].rsplit(" ", 1)[1]
    await willing.wait_invite(room_id)
    await willing.join(room_id)
    assert [m["content"]["body"] for m in await willing.messages(room_id)] == [
        "Your parcel has arrived."]


async def _listening(port: int, bot: Program) -> None:
    """Until the bridge inside the bot's process answers as ready."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        async def ready() -> bool:
            assert bot.proc is not None and bot.proc.returncode is None, bot.output()
            try:
                async with session.get(f"http://127.0.0.1:{port}/_dmbridge/v1/health/ready"
                                       ) as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False
        await wait_for(ready, timeout=60, what=f"the embedded bridge to start:\n{bot.output()}")


async def test_embedded_echo_bot_runs_the_bridge_and_the_bot_in_one_process(
    homeserver: Homeserver, db_url: str, new_human: Any, tmp_path: Path
) -> None:
    """examples/embedded_echo_bot.py: the bridge and the echo bot in one process, the bot's
    calls and events in-process. The human writes, the echo comes back; the process is killed
    (SIGKILL) and started again between two messages, and every message is echoed once."""
    homeserver.settings(db_url, tmp_path)  # writes tmp_path/config.yaml
    human: Human = await new_human()
    contact = f"echo{uuid.uuid4().hex[:8]}"
    bot = Program("embedded_echo_bot.py", {"ECHO_CURSOR": str(tmp_path / "echo.cursor")},
                  tmp_path)
    try:
        await bot.start(str(tmp_path / "config.yaml"), "chat")
        await _listening(homeserver.bridge_port, bot)
        async with Client(f"http://127.0.0.1:{homeserver.bridge_port}", CHAT_TOKEN,
                          "chat") as c:
            first = await c.send_message(contact, human.user_id, "Write to me")
            ghost = (await c.network_info()).ghost_user_id(contact)
        room_id = first.room_id
        await accept_dm(human, room_id, None)

        async def echoed(text: str) -> None:
            async def seen() -> bool:
                return text in _echoes(await human.messages(room_id), ghost)
            await wait_for(seen, timeout=90, what=f"the echo of {text!r}:\n{bot.output()}")

        await human.say(room_id, "one")
        await echoed("one")
        assert await bot.stop(signal.SIGKILL) == -signal.SIGKILL

        await human.say(room_id, "two")  # while the bridge and the bot are dead
        await bot.start(str(tmp_path / "config.yaml"), "chat")
        await _listening(homeserver.bridge_port, bot)
        await echoed("two")
        await human.say(room_id, "three")
        await echoed("three")
        assert await bot.stop(signal.SIGTERM) == 0, bot.output()
    finally:
        if bot.proc is not None and bot.proc.returncode is None:
            await bot.stop(signal.SIGKILL)  # a failed test leaves no process behind

    messages = await human.messages(room_id)
    assert _echoes(messages, ghost) == ["Write to me", "one", "two", "three"]
    assert {m["content"]["m.relates_to"]["m.in_reply_to"]["event_id"]
            for m in messages if m["sender"] == ghost and "m.relates_to" in m["content"]} == {
        m["event_id"] for m in messages if m["sender"] == human.user_id}
    assert int((tmp_path / "echo.cursor").read_text()) > 0
