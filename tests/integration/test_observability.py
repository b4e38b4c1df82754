"""What an admin watches: /metrics as Prometheus reads it, and the log with request IDs."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from dmbridge.bridge import Bridge
from dmbridge.localhs import free_port
from tests.integration.conftest import (
    BridgeFactory,
    Homeserver,
    NewHuman,
    Platform,
    accept_dm,
    bridges_on,
    wait_for,
)
from tests.support.process import BridgeProcess
from tests.support.settings import SMS_TOKEN
from tests.support.webhook import WebhookReceiver

SECRET = "webhook-secret-0123456789abcdef"
SEND_ROUTE = "/_dmbridge/v1/networks/{network}/messages/{message_id}"
SEND_ENDPOINT = "/_matrix/client/v3/rooms/{id}/send/{type}/{txn}"
FAMILIES = {
    "dmbridge_http_requests": "counter",
    "dmbridge_http_request_duration_seconds": "histogram",
    "dmbridge_homeserver_requests": "counter",
    "dmbridge_homeserver_request_duration_seconds": "histogram",
    "dmbridge_transactions": "counter",
    "dmbridge_events": "counter",
    "dmbridge_deliveries": "counter",
    "dmbridge_outbox_backlog": "gauge",
    "dmbridge_outbox_oldest_age_seconds": "gauge",
    "dmbridge_dead_letters": "gauge",
    "dmbridge_dms": "gauge",
    "dmbridge_db_query_duration_seconds": "histogram",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One scrape of /metrics, parsed by Prometheus' own parser."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: Samples = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str) -> float:
        return sum(v for (n, _), v in self.samples.items() if n == name)


async def scrape(session: aiohttp.ClientSession, url: str) -> Scrape:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        return Scrape(await resp.text())


async def scrape_until(session: aiohttp.ClientSession, url: str,
                       check: Callable[[Scrape], bool], what: str) -> Scrape:
    """Scrape until ``check`` holds (the database gauges are recounted at most every so often,
    and the homeserver's transactions come when they come); that scrape."""
    last: list[Scrape] = []

    async def holds() -> bool:
        last[:] = [await scrape(session, url)]
        return check(last[0])

    await wait_for(holds, what=what)
    return last[0]


def _phone() -> str:
    return "+1555" + str(uuid.uuid4().int)[:7]


async def test_metrics_count_what_the_bridge_did(
    start_bridge: BridgeFactory, homeserver: Homeserver, platform: Platform, new_human: NewHuman,
) -> None:
    """Every family is there, and moves by what the traffic did: N sends, one reply."""
    url = f"http://127.0.0.1:{homeserver.bridge_port}/metrics"
    async with WebhookReceiver(SECRET) as rx:
        bridge = await start_bridge(networks={"sms": {"delivery": {
            "mode": "webhook", "url": rx.url, "secret": SECRET}}})
        session = platform.session
        first = await scrape(session, url)
        assert {name: first.types.get(name) for name in FAMILIES} == FAMILIES
        # Every configured network is listed, with nothing waiting.
        assert first.value("dmbridge_outbox_backlog", network="sms") == 0
        assert first.value("dmbridge_outbox_backlog", network="chat") == 0
        assert first.value("dmbridge_dead_letters", network="sms") == 0

        human, phone = await new_human(), _phone()
        status, body = await platform.send("sms", SMS_TOKEN, "hello", sender=phone,
                                           recipient=human.user_id, text="Hi")
        assert status == 200, body
        room_id = body["room_id"]
        await accept_dm(human, room_id, bridge)

        before = await scrape(session, url)
        sends = 3
        for i in range(sends):
            status, body = await platform.send("sms", SMS_TOKEN, f"warm-{i}", sender=phone,
                                               recipient=human.user_id, text=f"message {i}")
            assert status == 200, body
        after = await scrape(session, url)
        sent = ("dmbridge_http_requests_total",
                {"method": "PUT", "route": SEND_ROUTE, "status": "200"})
        assert after.value(sent[0], **sent[1]) - before.value(sent[0], **sent[1]) == sends
        hs_send = {"method": "PUT", "endpoint": SEND_ENDPOINT, "status": "200"}
        assert (after.value("dmbridge_homeserver_requests_total", **hs_send)
                - before.value("dmbridge_homeserver_requests_total", **hs_send)) == sends
        latency = {"method": "PUT", "route": SEND_ROUTE}
        assert (after.value("dmbridge_http_request_duration_seconds_count", **latency)
                - before.value("dmbridge_http_request_duration_seconds_count", **latency)
                ) == sends
        assert after.total("dmbridge_db_query_duration_seconds_count") > before.total(
            "dmbridge_db_query_duration_seconds_count")
        await scrape_until(session, url, lambda m: m.value("dmbridge_dms", state="active") == 1,
                           "the DM to be counted as active")

        # The homeserver echoes the ghost's messages back in transactions: wait for all three,
        # so that the human's reply is the one event counted after them.
        message = {"type": "m.room.message", "outcome": "processed"}
        echoed = before.value("dmbridge_events_total", **message) + sends
        settled = await scrape_until(
            session, url, lambda m: m.value("dmbridge_events_total", **message) >= echoed,
            "the echoes of the sends to be processed")
        assert settled.value("dmbridge_events_total", **message) == echoed

        await human.say(room_id, "a reply")
        await rx.wait_accepted(1)
        delivered = {"network": "sms", "outcome": "delivered"}
        done = await scrape_until(
            session, url, lambda m: m.value("dmbridge_deliveries_total", **delivered) >= 1
            and m.value("dmbridge_outbox_backlog", network="sms") == 0,
            "the delivery to be counted and the backlog to empty")
    assert done.value("dmbridge_events_total", **message) == echoed + 1
    assert done.value("dmbridge_deliveries_total", **delivered) == 1
    assert done.value("dmbridge_deliveries_total", network="sms", outcome="retried") == 0
    assert done.value("dmbridge_outbox_backlog", network="sms") == 0
    assert done.value("dmbridge_outbox_oldest_age_seconds", network="sms") == 0
    assert done.value("dmbridge_transactions_total", outcome="recorded") > before.value(
        "dmbridge_transactions_total", outcome="recorded")
    assert done.value("dmbridge_transactions_total", outcome="failed") == 0


async def test_backlog_shows_what_waits_for_a_pull_network(
    start_bridge: BridgeFactory, homeserver: Homeserver, platform: Platform, new_human: NewHuman,
) -> None:
    """A reply not yet pulled is backlog; once acknowledged it is delivered and gone."""
    url = f"http://127.0.0.1:{homeserver.bridge_port}/metrics"
    bridge = await start_bridge()
    human, phone = await new_human(), _phone()
    status, body = await platform.send("sms", SMS_TOKEN, "hello", sender=phone,
                                       recipient=human.user_id, text="Hi")
    assert status == 200, body
    await accept_dm(human, body["room_id"], bridge)
    status, pulled = await platform.call("GET", "/networks/sms/events", SMS_TOKEN)
    assert status == 200, pulled
    status, _ = await platform.call("POST", "/networks/sms/events/ack", SMS_TOKEN,
                                    json={"ids": [e["id"] for e in pulled["events"]]})
    assert status == 200
    acked = (await scrape(platform.session, url)).value(
        "dmbridge_deliveries_total", network="sms", outcome="delivered")

    await human.say(body["room_id"], "are you there?")

    waits = await scrape_until(
        platform.session, url, lambda m: m.value("dmbridge_outbox_backlog", network="sms") == 1,
        "the reply to wait in the outbox")
    assert waits.value("dmbridge_outbox_oldest_age_seconds", network="sms") > 0
    status, pulled = await platform.call("GET", "/networks/sms/events", SMS_TOKEN)
    assert [e["type"] for e in pulled["events"]] == ["message"], pulled
    status, _ = await platform.call("POST", "/networks/sms/events/ack", SMS_TOKEN,
                                    json={"ids": [pulled["events"][0]["id"]]})
    assert status == 200
    done = await scrape_until(
        platform.session, url, lambda m: m.value("dmbridge_outbox_backlog", network="sms") == 0,
        "the backlog to empty")
    assert done.value("dmbridge_outbox_oldest_age_seconds", network="sms") == 0
    assert done.value("dmbridge_deliveries_total", network="sms", outcome="delivered") == \
        acked + 1


async def test_metrics_on_their_own_listener_or_off(homeserver: Homeserver, tmp_path: Path
                                                    ) -> None:
    """metrics.listen moves /metrics off the bridge's listener; enabled: false removes it."""
    main = f"http://127.0.0.1:{homeserver.bridge_port}/metrics"
    port = free_port()
    async with aiohttp.ClientSession() as session:
        async with bridges_on(homeserver, f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "a"
                              ) as start:
            bridge = await start(**{"metrics.listen": f"127.0.0.1:{port}"})
            assert bridge.metrics_port == port
            own = await scrape(session, f"http://127.0.0.1:{port}/metrics")
            assert "dmbridge_dms" in own.types
            async with session.get(main) as resp:
                assert resp.status == 404
            await bridge.stop()
        async with bridges_on(homeserver, f"sqlite:///{tmp_path / 'b.db'}", tmp_path / "b"
                              ) as start:
            await start(**{"metrics.enabled": False})
            async with session.get(main) as resp:
                assert resp.status == 404


async def test_bridges_in_one_process_count_apart(homeserver: Homeserver, tmp_path: Path,
                                                  platform: Platform) -> None:
    """Each bridge has its own registry: a second one starts at zero."""
    async with bridges_on(homeserver, f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "a"
                          ) as start:
        first: Bridge = await start()
        for _ in range(2):
            status, _ = await platform.call("GET", "/health", None)
            assert status == 200
        await first.stop()
        second: Bridge = await start()
        health = {"method": "GET", "route": "/_dmbridge/v1/health", "status": "200"}
        assert first.metrics.registry.get_sample_value(
            "dmbridge_http_requests_total", health) == 2
        assert second.metrics.registry.get_sample_value(
            "dmbridge_http_requests_total", health) is None


async def test_request_id_is_echoed_and_made_up_when_missing_or_unusable(
    bridge: Bridge, platform: Platform
) -> None:
    url = platform.base + "/health"
    async with platform.session.get(url, headers={"X-Request-ID": "plat-42.a"}) as resp:
        assert resp.headers["X-Request-ID"] == "plat-42.a"
    async with platform.session.get(url) as resp:
        assert re.fullmatch(r"req-[0-9a-f]{12}", resp.headers["X-Request-ID"])
    async with platform.session.get(url, headers={"X-Request-ID": "two words"}) as resp:
        assert re.fullmatch(r"req-[0-9a-f]{12}", resp.headers["X-Request-ID"])
    async with platform.session.get(platform.base + "/no/such/route",
                                    headers={"X-Request-ID": "lost-1"}) as resp:
        assert resp.status == 404
        assert resp.headers["X-Request-ID"] == "lost-1"


def _json_lines(path: Path) -> list[dict[str, Any]]:
    entries = []
    for line in path.read_text().splitlines():
        if line.startswith("=== BridgeProcess start"):  # the test harness's own marker
            continue
        entry = json.loads(line)  # every line the bridge wrote is one JSON object
        assert set(entry) >= {"time", "level", "logger", "message", "request_id"}, entry
        entries.append(entry)
    return entries


async def test_json_log_lines_carry_the_request_id(
    homeserver: Homeserver, db_url: str, tmp_path: Path, new_human: NewHuman,
) -> None:
    """logging.format json: every line parses, and each line a request causes has its ID."""
    folder = tmp_path / "bridge"
    homeserver.settings(db_url, folder, **{"logging.format": "json"})
    human, phone = await new_human(), _phone()
    async with aiohttp.ClientSession() as session, \
            BridgeProcess(folder / "config.yaml", folder / "bridge.log") as proc:
        proc.start()
        await proc.wait_ready(homeserver.bridge_port)
        platform = Platform(session, homeserver.bridge_port)
        url = f"{platform.base}/networks/sms/messages/first-{phone}"
        headers = {"Authorization": f"Bearer {SMS_TOKEN}", "X-Request-ID": "plat-first"}
        body = {"sender": phone, "recipient": human.user_id, "text": "Hi"}
        async with session.put(url, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["X-Request-ID"] == "plat-first"
            room_id = (await resp.json())["room_id"]
        await accept_dm(human, room_id, None)
        reply = await human.say(room_id, "hello back")

        async def pulled() -> bool:
            status, body = await platform.call("GET", "/networks/sms/events", SMS_TOKEN)
            assert status == 200, body
            return any(e["idempotency_key"] == reply for e in body["events"])

        await wait_for(pulled, what="the reply to reach the platform")
        assert await proc.terminate() == 0
    entries = _json_lines(folder / "bridge.log")
    # The self-check at start names its duration.
    pings = [e for e in entries
             if re.fullmatch(r"the homeserver reaches the bridge at http://127\.0\.0\.1:\d+ "
                             r"\(\d+ ms\)", e["message"])]
    assert pings, [e["message"] for e in entries]
    # The first message: registering the ghost, creating the room, the send, all with its ID.
    caused = [e for e in entries if e["request_id"] == "plat-first"]
    assert any("opened DM room" in e["message"] for e in caused), caused
    assert any("registered ghost" in e["message"] for e in caused), caused
    # Whatever mentions the ghost or the room was caused by that request or by a transaction.
    ghost = "=2b" + phone[1:]
    about_it = [e for e in entries if ghost in e["message"] or room_id in e["message"]]
    outside = [e for e in about_it if e["request_id"] != "plat-first"
               and not (e["request_id"] or "").startswith("txn-")]
    assert about_it and not outside, outside
    # The homeserver's transaction with the reply has its own ID, on each of its lines.
    with_reply = [e for e in entries if reply in e["message"]]
    assert with_reply, entries[-30:]
    assert all((e["request_id"] or "").startswith("txn-") for e in with_reply), with_reply


async def test_text_log_lines_carry_the_request_id(homeserver: Homeserver, tmp_path: Path,
                                                   new_human: NewHuman) -> None:
    """The default format: the request's ID in brackets before the message."""
    folder = tmp_path / "bridge"
    homeserver.settings(f"sqlite:///{tmp_path / 'dmbridge.db'}", folder)
    human, phone = await new_human(), _phone()
    async with aiohttp.ClientSession() as session, \
            BridgeProcess(folder / "config.yaml", folder / "bridge.log") as proc:
        proc.start()
        await proc.wait_ready(homeserver.bridge_port)
        url = (f"http://127.0.0.1:{homeserver.bridge_port}/_dmbridge/v1/networks/sms/messages/"
               f"first-{phone}")
        headers = {"Authorization": f"Bearer {SMS_TOKEN}", "X-Request-ID": "plat-text"}
        body = {"sender": phone, "recipient": human.user_id, "text": "Hi"}
        async with session.put(url, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            room_id = (await resp.json())["room_id"]
        assert await proc.terminate() == 0
    lines = (folder / "bridge.log").read_text().splitlines()
    opened = [line for line in lines if f"opened DM room {room_id}" in line]
    assert len(opened) == 1, lines
    assert re.search(r" INFO dmbridge\.opening: \[plat-text\] opened DM room ", opened[0])
    ping = [line for line in lines if "the homeserver reaches the bridge at" in line]
    assert len(ping) == 1 and re.search(r"INFO dmbridge\.readiness: the homeserver reaches the "
                                        r"bridge at "
                                        r"http://127\.0\.0\.1:\d+ \(\d+ ms\)$", ping[0]), ping
