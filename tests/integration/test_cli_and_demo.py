"""The command line as an admin uses it, and the quick-start demo as a newcomer sees it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from nio import AsyncClient, InviteMemberEvent, LoginResponse, SyncResponse

from dmbridge import payloads
from dmbridge.bridge import Bridge
from dmbridge.db import now_ms
from dmbridge.localhs import LocalSynapse, ensure_synapse, free_port
from tests.integration.conftest import BridgeFactory, Homeserver, Platform, wait_for
from tests.support.settings import CHAT_TOKEN
from tests.support.webhook import WebhookReceiver

WEBHOOK_SECRET = "cli-test-secret-0123456789"


async def _dmbridge(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dmbridge", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_admin_send_and_list_dms_through_the_running_bridge(
    bridge: Bridge, new_human, tmp_path: Path
) -> None:
    human = await new_human()
    config = str(tmp_path / "bridge" / "config.yaml")
    code, out, err = await _dmbridge("send", "-c", config, "--network", "chat",
                                     "--sender", "admin-test", "--sender-name", "Admin",
                                     "--to", human.user_id, "--text", "test DM from the CLI")
    assert code == 0, err
    sent = json.loads(out)
    assert sent["room_created"] is True
    invite = await human.wait_invite(sent["room_id"])
    assert invite.sender == "@dm_chat_admin-test:localhost"
    await human.join(sent["room_id"])
    [message] = await human.wait_messages(sent["room_id"], 1)
    assert message["content"]["body"] == "test DM from the CLI"

    code, out, err = await _dmbridge("list-dms", "-c", config, "--user", human.user_id)
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [line[:4] for line in lines] == [["chat", "admin-test", human.user_id,
                                             sent["room_id"]]]

    code, _, err = await _dmbridge("send", "-c", config, "--network", "chat", "--sender",
                                   "x", "--to", "@nobody-at-all:localhost", "--text", "hi")
    assert code == 1 and "DMBRIDGE_UNKNOWN_RECIPIENT" in _ + err


async def test_failed_self_ping_names_the_unreachable_url(
    start_bridge: BridgeFactory, homeserver: Homeserver, caplog: pytest.LogCaptureFixture
) -> None:
    # The registration tells the homeserver to call the usual port; this bridge listens elsewhere.
    caplog.set_level(logging.ERROR, logger="dmbridge")
    wrong_port = free_port()  # not the registration's: the homeserver calls another port
    bridge = await start_bridge(**{"appservice.port": wrong_port})
    assert not bridge.readiness.ready  # the start-up check found it, and says so
    expected = f"could not reach the bridge at http://127.0.0.1:{homeserver.bridge_port}"
    assert any(expected in r.getMessage() for r in caplog.records), caplog.text


async def test_quickstart_demo_leaves_alice_a_direct_message(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    code, out, err = await _dmbridge("demo", "--workdir", str(workdir), "--once")
    assert code == 0, err[-3000:]
    assert "log in as:   alice" in out
    assert "--once: the bridge and the homeserver are stopped now" in out
    assert "while" not in out.lower()
    password = (workdir / "alice-password.txt").read_text().strip()
    assert password in out

    # Start the demo's homeserver again and look as alice would, with a real client.
    synapse = LocalSynapse(workdir / "synapse", python=ensure_synapse(),
                           port=int(out.split("homeserver:  http://127.0.0.1:")[1].split()[0]))
    await asyncio.to_thread(synapse.start)
    client = AsyncClient(synapse.base_url, "@alice:localhost")
    try:
        assert isinstance(await client.login(password), LoginResponse)
        sync = await client.sync(timeout=1000)
        assert isinstance(sync, SyncResponse)
        [(room_id, room)] = sync.rooms.invite.items()
        invite = [e for e in room.invite_state if isinstance(e, InviteMemberEvent)
                  and e.state_key == "@alice:localhost"][-1]
        assert invite.sender == "@dm_example_demo-contact:localhost"
        assert invite.content["is_direct"] is True
        assert room_id in out
        await client.join(room_id)
        messages = await client.room_messages(room_id, limit=20)
        bodies = [e.source["content"].get("body") for e in messages.chunk  # type: ignore[union-attr]
                  if e.source.get("type") == "m.room.message"]
        assert bodies == ["Hello from dmbridge! This DM was routed in through the bridge's API."]
    finally:
        await client.close()
        await asyncio.to_thread(synapse.stop)


async def _shell(command: str, cwd: Path) -> tuple[int, str, str]:
    """As a user pastes it into a shell elsewhere, with no virtual environment active."""
    proc = await asyncio.create_subprocess_shell(
        command, cwd=cwd, env={**os.environ, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_demos_printed_commands_run_as_printed(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dmbridge", "demo", "--workdir", str(workdir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    assert demo.stdout is not None
    printed: list[str] = []
    client: AsyncClient | None = None
    try:
        while not printed or "Ctrl-C stops" not in printed[-1]:
            line = await asyncio.wait_for(demo.stdout.readline(), 180)
            assert line, f"the demo ended early: {printed}"
            printed.append(line.decode())
        text = "".join(printed)
        send = printed[next(i for i, x in enumerate(printed) if x.endswith("in with:\n")) + 1]
        curl = printed[next(i for i, x in enumerate(printed) if "the pull API" in x) + 1]
        room_id = "!" + text.split(") in !")[1].split()[0]

        code, out, err = await _shell(send.strip(), tmp_path)
        assert code == 0, (send, err)
        sent = json.loads(out)
        assert sent["room_id"] == room_id and sent["room_created"] is False

        password = (workdir / "alice-password.txt").read_text().strip()
        homeserver = text.split("homeserver:  ")[1].split()[0]
        client = AsyncClient(homeserver, "@alice:localhost")
        assert isinstance(await client.login(password), LoginResponse)
        await client.join(room_id)
        await client.room_send(room_id, "m.room.message", {"msgtype": "m.text",
                                                           "body": "hello, contact"})

        async def reply_pulled() -> bool:
            code, out, err = await _shell(curl.strip(), tmp_path)
            assert code == 0, (curl, err)
            return "hello, contact" in json.dumps(json.loads(out)["events"])

        await wait_for(reply_pulled, what="alice's reply in the pull API")
    finally:
        if client is not None:
            await client.close()
        if demo.returncode is None:
            demo.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(demo.wait(), 60)
    assert code == 0

    # The demo's ports are kept for the next run: taken, they are refused in one line.
    port = int(curl.split("http://127.0.0.1:")[1].split("/")[0])
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        code, out, err = await _dmbridge("demo", "--workdir", str(workdir), "--once")
    assert code == 1
    [line] = err.strip().splitlines()[-1:]
    assert line.startswith(f"dmbridge: port {port} on 127.0.0.1 (the demo's bridge) is taken"), err
    assert "Traceback" not in err


async def test_admin_lists_and_retries_dead_letters(
    start_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """`dmbridge dead-letters` shows what a platform never accepted, and sends it again."""
    rx = WebhookReceiver(WEBHOOK_SECRET)  # not listening yet: every delivery is refused
    bridge = await start_bridge(
        networks={"sms": {"delivery": {"mode": "webhook", "url": rx.url,
                                       "secret": WEBHOOK_SECRET}}},
        **{"delivery.max_attempts": 1},
    )
    config = str(tmp_path / "bridge" / "config.yaml")
    lane = payloads.Lane("sms", "+15551230000", "@someone:localhost", "@dm_sms_x:localhost")
    item_ids = []
    for n in range(2):
        payload = payloads.notice(lane, payloads.DM_ENDED, "!r:localhost", "ended", "test",
                                  f"$cli-{n}", now_ms())
        item_ids.append(await bridge.stores.outbox.add_now(
            network="sms", remote_id=lane.remote_id, user_id=lane.user_id,
            type=payloads.DM_ENDED, key=payload["idempotency_key"], payload=payload,
            now=now_ms(),
        ))
    bridge.outbox.wake({"sms"})

    async def all_dead() -> bool:
        # The two, and the platform's notices of them (refused too): nothing left pending
        # to reach the receiver before what is retried.
        dead = await bridge.stores.outbox.dead_letters("sms", 100)
        told = [d for d in dead if d.type == payloads.DELIVERY_FAILED]
        return {d.id for d in dead} >= set(item_ids) and len(told) == 2

    await wait_for(all_dead, what="two dead letters and the notices of them")
    code, out, err = await _dmbridge("dead-letters", "-c", config, "--network", "sms")
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    listed = {int(row[1]): row for row in rows if row[2] == payloads.DM_ENDED}
    assert set(listed) == set(item_ids), out
    assert all(row[0] == "sms" and row[3] == lane.remote_id and "gave up" in row[6]
               for row in listed.values()), out

    await rx.start()
    try:
        code, out, err = await _dmbridge("dead-letters", "-c", config, "--network", "sms",
                                         "--retry", str(item_ids[0]))
        assert (code, out.strip()) == (0, f"sms: queued again: {item_ids[0]}"), err
        [first] = await rx.wait_accepted(1)
        assert first.json["idempotency_key"] == f"{payloads.DM_ENDED}:$cli-0"
        code, out, err = await _dmbridge("dead-letters", "-c", config, "--retry-all")
        assert code == 0 and f"sms: queued again: {item_ids[1]}" in out, (out, err)
        delivered = await rx.wait_accepted(2)
        assert delivered[1].json["idempotency_key"] == f"{payloads.DM_ENDED}:$cli-1"
        assert all(d.signature_ok for d in delivered)
    finally:
        await rx.stop()


async def test_admin_clears_a_decline(bridge: Bridge, platform: Platform, new_human,
                                      tmp_path: Path) -> None:
    """After `dmbridge clear-declined`, a platform may write to a user who rejected it."""
    human = await new_human()
    config = str(tmp_path / "bridge" / "config.yaml")
    body = {"sender": "carol", "recipient": human.user_id, "text": "hello"}
    status, sent = await platform.send("chat", CHAT_TOKEN, "m1", **body)
    assert status == 200, sent
    await human.wait_invite(sent["room_id"])
    await human.reject(sent["room_id"])

    attempts = iter(range(1000))

    async def declined() -> bool:  # each try is a new message: a sent one would be a duplicate
        status, err = await platform.send("chat", CHAT_TOKEN, f"m2-{next(attempts)}", **body)
        return status == 403 and err["errcode"] == "DMBRIDGE_DECLINED"

    await wait_for(declined, what="the decline")
    code, out, err = await _dmbridge("clear-declined", "-c", config, "--network", "chat",
                                     "--remote-id", "carol", "--user", human.user_id)
    assert code == 0 and "opens a new DM" in out, err
    status, again = await platform.send("chat", CHAT_TOKEN, "m3", **body)
    assert status == 200 and again["room_created"] is True and again["room_id"] != sent["room_id"]
    await human.wait_invite(again["room_id"])

    code, out, err = await _dmbridge("clear-declined", "-c", config, "--network", "chat",
                                     "--remote-id", "carol", "--user", human.user_id)
    assert code == 1 and "has not declined" in err, (out, err)
