"""Start-up against a real Synapse that is down or set up wrong, as an admin sees it: the
bridge's log, its readiness endpoint, and what ``dmbridge doctor`` prints.

Each bridge runs as a real process (``dmbridge run``). The homeserver is the session's Synapse
(registration for the usual port, tokens and networks), or a Synapse of the test's own that it
starts, stops and restarts with or without the registration.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ruamel.yaml import YAML

from dmbridge.config import Settings, write_registration
from dmbridge.localhs import LocalSynapse, ensure_synapse, free_port
from tests.integration.conftest import DOMAIN, Homeserver, humans_on, wait_for
from tests.support.process import LIVE_PATHS, BridgeProcess
from tests.support.settings import SMS_TOKEN, make_settings
from tests.support.webhook import WebhookReceiver

READY = "/_dmbridge/v1/health/ready"
LIVE = "/_dmbridge/v1/health/live"
REGENERATE = "run `dmbridge generate` again"


async def get(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.json(content_type=None)


async def doctor(config: Path, registration: Path | None = None) -> tuple[int, list[str]]:
    args = ["-r", str(registration)] if registration else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dmbridge", "doctor", "-c", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=config.parent)
    out, err = await proc.communicate()
    assert b"Traceback" not in out + err, (out + err).decode()
    assert err == b"", err.decode()
    return proc.returncode or 0, out.decode().splitlines()


def problem_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("problem ")]


def log_lines(bridge: BridgeProcess, fragment: str) -> list[str]:
    """The lines holding ``fragment``; DEBUG lines only if it is there (every attempt)."""
    return [x for x in bridge.log_path.read_text().splitlines()
            if fragment in x and (" DEBUG " not in x or " DEBUG " in fragment)]


async def until_logged(bridge: BridgeProcess, fragment: str, count: int = 1) -> None:
    async def logged() -> bool:
        assert bridge.running or bridge.returncode == 1, bridge.log_tail()
        return len(log_lines(bridge, fragment)) >= count

    await wait_for(logged, what=f"{count} log line(s) with {fragment!r}:\n{bridge.log_tail()}")


async def until_ready(bridge: BridgeProcess, port: int) -> None:
    async def ready() -> bool:
        assert bridge.running, bridge.log_tail()
        try:
            return (await get(port, READY))[0] == 200
        except aiohttp.ClientError:
            return False

    await wait_for(ready, timeout=60, what=f"readiness:\n{bridge.log_tail()}")


async def until_failing(bridge: BridgeProcess, port: int, check: str) -> None:
    async def failing() -> bool:
        assert bridge.running, bridge.log_tail()
        status, body = await get(port, READY)
        return status == 503 and check in [p["check"] for p in body["failing"]]

    await wait_for(failing, timeout=60, what=f"{check} to fail:\n{bridge.log_tail()}")


def config_for(folder: Path, hs_url: str, port: int, db_url: str | None = None,
               **overrides: Any) -> tuple[Path, Settings]:
    settings = make_settings(folder, homeserver_url=hs_url, domain=DOMAIN, port=port,
                             db_url=db_url or f"sqlite:///{folder / 'dmbridge.db'}", **overrides)
    config = folder / "config.yaml"
    config.chmod(0o600)  # as `dmbridge generate` writes it
    return config, settings


@pytest.fixture
async def own_synapse(tmp_path: Path) -> AsyncIterator[tuple[LocalSynapse, Path]]:
    """A Synapse of this test's own, not started; its registration file, not written yet."""
    registration = tmp_path / "registration.yaml"
    synapse = LocalSynapse(tmp_path / "hs", server_name=DOMAIN, python=ensure_synapse(),
                           registration_files=[registration])
    yield synapse, registration
    await asyncio.to_thread(synapse.stop)


# --- the homeserver is not up yet ------------------------------------------------------------


async def test_a_bridge_started_before_the_homeserver_waits_then_becomes_ready_and_delivers(
    own_synapse: tuple[LocalSynapse, Path], tmp_path: Path
) -> None:
    synapse, registration = own_synapse
    port = free_port()
    config, settings = config_for(tmp_path / "bridge", synapse.base_url, port)
    write_registration(settings, registration)
    async with BridgeProcess(config, tmp_path / "bridge.log") as bridge:
        bridge.start()
        await bridge.wait_ready(port, paths=LIVE_PATHS)
        assert (await get(port, LIVE)) == (200, {"status": "ok"})
        # Several attempts (logged at DEBUG) ...
        await until_logged(bridge, " DEBUG dmbridge.readiness: not ready (next check in", count=3)
        status, body = await get(port, READY)
        assert status == 503, body
        [failing] = body["failing"]
        assert failing["check"] == "homeserver"
        assert f"the homeserver at {synapse.base_url} (homeserver.address) is unreachable" \
            in failing["error"]
        # ... and one line saying what it waits for, not one per attempt.
        waits = log_lines(bridge, f"waiting for the homeserver at {synapse.base_url} "
                          "(homeserver.address): cannot connect")
        assert len(waits) == 1, bridge.log_tail()
        assert " WARNING " in waits[0] and "retrying, next in " in waits[0]
        assert bridge.running

        await asyncio.to_thread(synapse.start)
        await until_ready(bridge, port)
        assert log_lines(bridge, "INFO dmbridge.readiness: ready")

        async with humans_on(Homeserver(synapse, port, tmp_path)) as new_human:
            human = await new_human()
            async with aiohttp.ClientSession() as session, session.put(
                f"http://127.0.0.1:{port}/_dmbridge/v1/networks/sms/messages/late-1",
                headers={"Authorization": f"Bearer {SMS_TOKEN}"},
                json={"sender": "+15550001111", "recipient": human.user_id,
                      "text": "after the homeserver came up"},
            ) as resp:
                sent = await resp.json()
                assert resp.status == 200, sent
            await human.wait_invite(sent["room_id"])
            await human.join(sent["room_id"])
            [message] = await human.wait_messages(sent["room_id"], 1)
            assert message["content"]["body"] == "after the homeserver came up"

        # Checked again after start: a homeserver that goes away makes it not ready.
        await asyncio.to_thread(synapse.stop)
        await until_failing(bridge, port, "homeserver")
        await bridge.terminate()


# --- set-up mistakes ---------------------------------------------------------------------------


async def test_a_registration_the_homeserver_has_not_loaded_is_named_until_it_is_loaded(
    own_synapse: tuple[LocalSynapse, Path], tmp_path: Path
) -> None:
    """``dmbridge generate`` ran, but the homeserver was not restarted with the registration."""
    synapse, registration = own_synapse
    port = free_port()
    config, settings = config_for(tmp_path / "bridge", synapse.base_url, port)
    write_registration(settings, registration)
    synapse.registration_files = []
    await asyncio.to_thread(synapse.start)
    cause = "the homeserver does not know the bridge's as_token (401 M_UNKNOWN_TOKEN"
    async with BridgeProcess(config, tmp_path / "bridge.log") as bridge:
        bridge.start()
        await until_logged(bridge, cause)
        [line] = log_lines(bridge, cause)
        assert " ERROR dmbridge.readiness: not ready: " in line
        assert "has not loaded the registration" in line
        assert "restart the homeserver" in line
        status, body = await get(port, READY)
        assert status == 503 and body["failing"][0]["check"] == "registration", body

        code, lines = await doctor(config, registration)
        assert code == 1
        [found] = [x for x in problem_lines(lines) if x.startswith("problem registration:")]
        assert cause in found and "has not loaded the registration" in found
        assert "fix: add the registration file to the homeserver's app_service_config_files " \
               "and restart the homeserver" in found

        # The admin restarts the homeserver with the registration: ready, no bridge restart.
        await asyncio.to_thread(synapse.stop)
        synapse.registration_files = [registration.resolve()]
        await asyncio.to_thread(synapse.start)
        await until_ready(bridge, port)
        assert bridge.starts == 1
        await bridge.terminate()


async def test_a_wrong_as_token(homeserver: Homeserver, tmp_path: Path) -> None:
    config, _ = config_for(tmp_path, homeserver.url, homeserver.bridge_port,
                           **{"appservice.as_token": "not-the-registered-as-token"})
    cause = "the homeserver does not know the bridge's as_token (401 M_UNKNOWN_TOKEN"
    async with BridgeProcess(config, tmp_path / "bridge.log") as bridge:
        bridge.start()
        await until_logged(bridge, cause)
        [line] = log_lines(bridge, cause)
        # Without the registration file at hand, both causes and both fixes.
        assert "or appservice.as_token differs from the as_token in the registration it " \
               "loaded" in line and REGENERATE in line and "restart the homeserver" in line
        assert (await get(homeserver.bridge_port, READY))[0] == 503
        code, lines = await doctor(config, homeserver.folder / "registration.yaml")
        await bridge.terminate()
    assert code == 1
    problems = problem_lines(lines)
    assert any(x.startswith("problem registration file:") and "differs from the config in: "
               "as_token" in x for x in problems), lines
    assert any(x.startswith("problem registration:") and cause in x and "appservice.as_token "
               "differs from the as_token in the registration file" in x for x in problems), lines


async def test_a_wrong_hs_token(homeserver: Homeserver, tmp_path: Path) -> None:
    config, _ = config_for(tmp_path, homeserver.url, homeserver.bridge_port,
                           **{"appservice.hs_token": "not-the-registered-hs-token"})
    cause = "the homeserver reached the bridge at " \
        f"http://127.0.0.1:{homeserver.bridge_port}, but with an hs_token the bridge refuses"
    async with BridgeProcess(config, tmp_path / "bridge.log") as bridge:
        bridge.start()
        await until_logged(bridge, cause)
        [line] = log_lines(bridge, cause)
        assert "appservice.hs_token differs from the hs_token in the registration the " \
               "homeserver loaded" in line and REGENERATE in line
        # The bridge's listener says it refused the homeserver's call.
        # (after the ID of the homeserver's request: "[hs-0123456789ab] ")
        refused = log_lines(bridge, "refused POST /_matrix/app/v1/ping: its hs_token is not "
                            "appservice.hs_token")
        assert refused and all(re.search(r"WARNING dmbridge\.appservice: \[hs-[0-9a-f]{12}\] "
                                         r"refused POST", line) for line in refused), refused
        status, body = await get(homeserver.bridge_port, READY)
        assert status == 503 and [p["check"] for p in body["failing"]] == ["ping"], body
        code, lines = await doctor(config)  # no registration file beside this config
        await bridge.terminate()
    assert code == 1
    assert len(problem_lines(lines)) == 1, lines
    [found] = problem_lines(lines)
    assert found.startswith("problem ping: ") and cause in found, lines
    assert any(x.startswith("skip registration file: ") for x in lines), lines


async def test_a_wrong_homeserver_domain_stops_the_bridge(homeserver: Homeserver,
                                                          tmp_path: Path) -> None:
    config, _ = config_for(tmp_path, homeserver.url, homeserver.bridge_port,
                           **{"homeserver.domain": "wrong.example"})
    cause = "the homeserver names the bridge's bot @dmbridge_bot:localhost, on the domain " \
        "localhost, but homeserver.domain is wrong.example"
    async with BridgeProcess(config, tmp_path / "bridge.log") as bridge:
        bridge.start()

        async def exited() -> bool:
            return not bridge.running

        await wait_for(exited, timeout=60, what=f"the bridge to exit:\n{bridge.log_tail()}")
        assert bridge.returncode == 1
    errors = log_lines(bridge, " ERROR ")
    assert len(errors) == 1, bridge.log_tail()
    assert f"could not start: {cause}; set homeserver.domain to localhost" in errors[0]
    assert "Traceback" not in bridge.log_path.read_text()

    code, lines = await doctor(config)
    assert code == 1
    assert any(x.startswith("problem registration: ") and cause in x for x in lines), lines


async def test_a_network_added_without_a_new_registration(homeserver: Homeserver,
                                                          tmp_path: Path) -> None:
    config, _ = config_for(tmp_path, homeserver.url, homeserver.bridge_port)
    yaml = YAML()
    data = yaml.load(config)
    data["networks"].append({**data["networks"][1], "id": "fax", "name": "Fax",
                             "tokens": ["fax-token-0123456789abcdef"]})
    yaml.dump(data, config)
    cause = "the ghosts of network fax (@dm_fax_namespace-check:localhost) are not in the " \
        "namespaces of the registration the homeserver loaded"
    async with BridgeProcess(config, tmp_path / "bridge.log") as bridge:
        bridge.start()
        await until_logged(bridge, cause)
        [line] = log_lines(bridge, cause)
        assert "Application service cannot masquerade" in line and REGENERATE in line
        status, body = await get(homeserver.bridge_port, READY)
        assert status == 503 and [p["check"] for p in body["failing"]] == ["network fax"], body
        code, lines = await doctor(config, homeserver.folder / "registration.yaml")
        await bridge.terminate()
    assert code == 1
    problems = problem_lines(lines)
    assert len(problems) == 2, lines
    assert problems[0].startswith("problem registration file: ") and \
        "the namespaces of network(s) fax" in problems[0]
    assert problems[1].startswith("problem network fax: ") and cause in problems[1]
    assert "ok network sms: " in "\n".join(lines)


# --- the doctor ----------------------------------------------------------------------------------


async def test_doctor_finds_nothing_wrong_in_a_good_set_up(homeserver: Homeserver,
                                                           tmp_path: Path, db_url: str) -> None:
    async with WebhookReceiver("webhook-secret-0123456789") as rx:
        webhook = {"mode": "webhook", "url": rx.url, "secret": "webhook-secret-0123456789"}
        config, _ = config_for(tmp_path, homeserver.url, homeserver.bridge_port, db_url,
                               networks={"sms": {"delivery": webhook}})
        async with BridgeProcess(config, tmp_path / "bridge.log") as bridge:
            bridge.start()
            await bridge.wait_ready(homeserver.bridge_port)
            code, lines = await doctor(config, homeserver.folder / "registration.yaml")
            await bridge.terminate()
    assert code == 0, lines
    assert all(line.startswith("ok ") for line in lines), lines
    checks = [line.split(":")[0] for line in lines]
    for check in ("ok config", "ok config file", "ok registration file", "ok database",
                  "ok homeserver", "ok registration", "ok network sms", "ok network chat",
                  "ok ping", "ok webhook sms"):
        assert check in checks, lines
    assert any("schema version" in x and "(current)" in x for x in lines), lines


async def test_doctor_names_a_stopped_bridge_unreachable_webhook_and_database_open_files(
    homeserver: Homeserver, tmp_path: Path
) -> None:
    hook = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    db_port = free_port()  # no PostgreSQL there either
    config, _ = config_for(tmp_path, homeserver.url, free_port(),
                           f"postgres://dmbridge:secret@127.0.0.1:{db_port}/dmbridge", networks={
                               "chat": {"delivery": {"mode": "webhook", "url": hook,
                                                     "secret": "webhook-secret-0123456789"}}})
    config.chmod(0o644)
    code, lines = await doctor(config, homeserver.folder / "registration.yaml")
    assert code == 1
    problems = problem_lines(lines)
    assert f"problem config file: {config} has mode 0644: others may read it" in "\n".join(
        problems) and f"fix: chmod 600 {config}" in "\n".join(problems), lines
    assert any(x.startswith(f"problem webhook chat: {hook} (networks[1].delivery.url) is "
                            "unreachable") for x in problems), lines
    assert f"problem database: database postgres://dmbridge:***@127.0.0.1:{db_port}/dmbridge:" \
        " cannot connect (" in "\n".join(problems), lines
    assert "fix: check that PostgreSQL runs and accepts connections there" in "\n".join(lines)
    assert "secret@" not in "\n".join(lines)
    [ping] = [x for x in lines if " ping: " in x]
    assert ping.startswith("skip ping: the bridge is not running at ")
