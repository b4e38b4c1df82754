"""The metrics' pieces: labels that stay few, counts by outcome, the database gauges' pace,
statement timing, and the exposition a scraper reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from dmbridge.db import Stores, now_ms
from dmbridge.db.timing import time_queries
from dmbridge.homeserver import Homeserver, RequestLog, endpoint_of
from dmbridge.localhs import free_port
from dmbridge.metrics import UNMATCHED, DatabaseGauges, Metrics, StoreCounts, exposition
from dmbridge.ratelimit import HomeserverLimits


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.mark.parametrize(("path", "endpoint"), [
    ("/_matrix/client/v3/rooms/!r:x/send/m.room.message/txn-1",
     "/_matrix/client/v3/rooms/{id}/send/{type}/{txn}"),
    ("/_matrix/client/v3/rooms/!r/state/m.room.member/@u:x",
     "/_matrix/client/v3/rooms/{id}/state/{id}/{id}"),
    ("/_matrix/client/v3/rooms/!r/redact/$e/t", "/_matrix/client/v3/rooms/{id}/redact/{id}/{txn}"),
    ("/_matrix/client/v1/media/download/example.org/AbCdEf",
     "/_matrix/client/v1/media/download/{server}/{media_id}"),
    ("/_matrix/media/v3/thumbnail/example.org/AbCdEf/name.png",
     "/_matrix/media/v3/thumbnail/{server}/{media_id}/{filename}"),
    ("/_matrix/media/v3/upload", "/_matrix/media/v3/upload"),
    ("/_matrix/client/v3/directory/room/#alias:x", "/_matrix/client/v3/directory/room/{id}"),
])
def test_homeserver_endpoints_carry_no_ids(path: str, endpoint: str) -> None:
    assert endpoint_of(path) == endpoint


def test_unusual_event_types_are_counted_as_other() -> None:
    metrics = Metrics()
    metrics.event("m.room.message", "processed")
    metrics.event("com.example.anything-at-all", "processed")
    metrics.event(None, "skipped")
    assert _value(metrics, "dmbridge_events_total", type="m.room.message",
                  outcome="processed") == 1
    assert _value(metrics, "dmbridge_events_total", type="other", outcome="processed") == 1
    assert _value(metrics, "dmbridge_events_total", type="other", outcome="skipped") == 1


def test_each_metrics_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.delivery("sms", "delivered", 3)
    two.delivery("sms", "delivered", 0)  # nothing acknowledged: no sample made up
    assert _value(one, "dmbridge_deliveries_total", network="sms", outcome="delivered") == 3
    assert _value(two, "dmbridge_deliveries_total", network="sms", outcome="delivered") is None


async def _client(app: web.Application) -> TestClient[web.Request, web.Application]:
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_listener_requests_are_counted_by_route_template_and_status() -> None:
    metrics = Metrics()

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})

    async def refuse(request: web.Request) -> web.Response:
        raise web.HTTPForbidden()

    async def fail(request: web.Request) -> web.Response:
        raise RuntimeError("boom")

    app = web.Application(middlewares=[metrics.middleware()])
    app.router.add_get("/things/{thing_id}", ok)
    app.router.add_get("/refuse", refuse)
    app.router.add_get("/fail", fail)
    client = await _client(app)
    try:
        for thing in ("a", "b", "c"):
            assert (await client.get(f"/things/{thing}")).status == 200
        assert (await client.get("/refuse")).status == 403
        assert (await client.get("/fail")).status == 500
        assert (await client.get("/nowhere/at/all")).status == 404
    finally:
        await client.close()
    assert _value(metrics, "dmbridge_http_requests_total", method="GET",
                  route="/things/{thing_id}", status="200") == 3
    assert _value(metrics, "dmbridge_http_request_duration_seconds_count", method="GET",
                  route="/things/{thing_id}") == 3
    assert _value(metrics, "dmbridge_http_requests_total", method="GET", route="/refuse",
                  status="403") == 1
    assert _value(metrics, "dmbridge_http_requests_total", method="GET", route="/fail",
                  status="500") == 1
    assert _value(metrics, "dmbridge_http_requests_total", method="GET", route=UNMATCHED,
                  status="404") == 1


async def test_homeserver_requests_by_endpoint_and_status_and_no_answer() -> None:
    async def send(request: web.Request) -> web.Response:
        return web.json_response({"event_id": "$e"})

    app = web.Application()
    app.router.add_put("/_matrix/client/v3/rooms/{room}/send/{type}/{txn}", send)
    server = TestServer(app)
    await server.start_server()
    metrics = Metrics()
    limits = HomeserverLimits(RequestLog(), background_wait=5, metrics=metrics)
    hs = Homeserver(str(server.make_url("")), "token", [limits.middleware])
    gone = Homeserver(f"http://127.0.0.1:{free_port()}", "token", [limits.middleware])
    try:
        for i in range(2):
            await hs.send_event("@g:x", "!r:x", "m.room.message", f"t{i}", {})  # type: ignore
        with pytest.raises(aiohttp.ClientError):  # nobody listens there: no answer at all
            await gone.send_event("@g:x", "!r:x", "m.room.message", "t9", {},  # type: ignore
                                  attempts=1)
    finally:
        await hs.close()
        await gone.close()
        await server.close()
        limits.close()
    endpoint = "/_matrix/client/v3/rooms/{id}/send/{type}/{txn}"
    assert _value(metrics, "dmbridge_homeserver_requests_total", method="PUT",
                  endpoint=endpoint, status="200") == 2
    assert _value(metrics, "dmbridge_homeserver_requests_total", method="PUT",
                  endpoint=endpoint, status="error") == 1
    assert _value(metrics, "dmbridge_homeserver_request_duration_seconds_count", method="PUT",
                  endpoint=endpoint) == 3


class FixedCounts:
    """Counts as a database would give them; counts how often it was asked."""

    def __init__(self) -> None:
        self.asked = 0
        self.backlog_rows: dict[str, tuple[int, int]] = {}

    async def dms_by_state(self) -> dict[str, int]:
        self.asked += 1
        return {"active": 2, "ended": 5}

    async def backlog(self) -> dict[str, tuple[int, int]]:
        return self.backlog_rows

    async def dead_letters(self) -> dict[str, int]:
        return {"sms": 4}


async def test_database_gauges_list_every_network_and_age_the_oldest_item() -> None:
    metrics, counts = Metrics(), FixedCounts()
    counts.backlog_rows = {"sms": (3, 1_000_000)}
    gauges = DatabaseGauges(metrics, counts, ["sms", "chat"], clock=lambda: 1_060.0)
    await gauges.refresh()
    assert _value(metrics, "dmbridge_dms", state="active") == 2
    assert _value(metrics, "dmbridge_dms", state="ended") == 5
    assert _value(metrics, "dmbridge_outbox_backlog", network="sms") == 3
    assert _value(metrics, "dmbridge_outbox_oldest_age_seconds", network="sms") == 60
    assert _value(metrics, "dmbridge_outbox_backlog", network="chat") == 0
    assert _value(metrics, "dmbridge_outbox_oldest_age_seconds", network="chat") == 0
    assert _value(metrics, "dmbridge_dead_letters", network="sms") == 4
    assert _value(metrics, "dmbridge_dead_letters", network="chat") == 0


async def test_database_gauges_are_not_recounted_sooner_than_the_count_is_cheap() -> None:
    now = [100.0]
    counts = FixedCounts()
    original = counts.dms_by_state

    async def slow() -> dict[str, int]:
        now[0] += 0.5  # the count takes half a second
        return await original()

    counts.dms_by_state = slow  # type: ignore[method-assign]
    gauges = DatabaseGauges(Metrics(), counts, ["sms"], clock=lambda: now[0])
    await gauges.refresh()
    now[0] += 10  # far less than a hundred times half a second
    await gauges.refresh()
    assert counts.asked == 1
    now[0] += 50
    await gauges.refresh()
    assert counts.asked == 2


async def test_store_counts_and_statement_timing(stores: Stores) -> None:
    """The counts read the tables; every statement is timed, in and out of transactions."""
    metrics = Metrics()
    time_queries(stores.db, metrics.db_query)
    now = now_ms()
    for i in range(3):
        await stores.outbox.add_now(network="sms", remote_id="r", user_id="@u:x",
                                    type="message", key=f"k{i}", payload={}, now=now - i * 1000)
    [first, *_] = await stores.outbox.due_heads(["sms"], now, 10)
    assert await stores.outbox.kill(first.id, 1, "gone", now)
    async with stores.db.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1")
    counts = StoreCounts(stores)
    assert await counts.backlog() == {"sms": (2, now - 2000)}
    assert await counts.dead_letters() == {"sms": 1}
    assert await counts.dms_by_state() == {}
    timed = {op: _value(metrics, "dmbridge_db_query_duration_seconds_count", operation=op)
             for op in ("execute", "fetch", "fetchval")}
    assert all(count and count >= 1 for count in timed.values()), timed


def test_exposition_parses_and_follows_the_accept_header() -> None:
    metrics = Metrics()
    metrics.transaction("recorded")
    plain = exposition(metrics.registry, "")
    assert plain.content_type == "text/plain"
    assert plain.body is not None and isinstance(plain.body, bytes)
    families = {f.name: f for f in text_string_to_metric_families(plain.body.decode())}
    [sample] = families["dmbridge_transactions"].samples
    assert sample.labels == {"outcome": "recorded"} and sample.value == 1
    open_metrics = exposition(metrics.registry, "application/openmetrics-text; version=1.0.0")
    assert open_metrics.content_type == "application/openmetrics-text"



def test_the_dashboard_and_readme_name_only_metrics_that_exist() -> None:
    """contrib/grafana-dashboard.json and README's table use the families the bridge has."""
    root = Path(__file__).resolve().parents[2]
    metrics = Metrics()
    names = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    names |= {f"{family.name}{suffix}" for family in metrics.registry.collect()
              for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    dashboard = json.loads((root / "contrib" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"dmbridge_[a-z_]+", expr)}
    assert used and used <= names, used - names
    readme = (root / "README.md").read_text()
    table = readme[readme.index("### Metrics"):readme.index("### Logs")]
    documented = set(re.findall(r"^\| `(dmbridge_[a-z_]+)`", table, re.MULTILINE))
    families = {f"{f.name}_total" if f.type == "counter" else f.name
                for f in metrics.registry.collect()}
    assert documented == families
