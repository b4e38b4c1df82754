"""The SDK against a fake bridge: errors, retries, create_dm, discovery and the router."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import dmbridge_client as sdk
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from dmbridge_client.errors import ERRORS, UnexpectedAnswer, api_error
from ruamel.yaml import YAML

Route = Callable[[web.Request], Awaitable[web.StreamResponse]]
ServerFactory = Callable[[list[tuple[str, str, Route]]], Awaitable[str]]


@pytest.fixture
async def fake_bridge(aiohttp_server: Any) -> ServerFactory:
    """A fake bridge serving the given (method, path, handler) routes; its base URL."""
    async def make(routes: list[tuple[str, str, Route]]) -> str:
        app = web.Application()
        for method, path, handler in routes:
            app.router.add_route(method, "/_dmbridge/v1" + path, handler)
        server: TestServer = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/")
    return make


def _error(status: int, errcode: str, headers: dict[str, str] | None = None,
           **extra: Any) -> web.Response:
    return web.json_response({"errcode": errcode, "error": f"fake {errcode}", **extra},
                             status=status, headers=headers)


def test_every_error_code_the_api_documents_has_its_exception_saying_what_to_do() -> None:
    spec = YAML(typ="safe").load(
        resources.files("dmbridge").joinpath("api/openapi.yaml").read_text())
    documented = spec["components"]["schemas"]["Error"]["properties"]["errcode"]["enum"]
    assert sorted(ERRORS) == sorted(documented)
    for errcode in documented:
        error = api_error(400, {"errcode": errcode, "error": "why"}, "req-1", 2.0)
        assert type(error) is ERRORS[errcode] and error.code == errcode
        assert str(error).startswith(f"400 {errcode}: why -> ") and "[request req-1]" in str(error)
        assert (error.advice and error.advice != sdk.APIError.advice) or errcode == "M_UNKNOWN"
    assert isinstance(api_error(429, {"errcode": "DMBRIDGE_QUOTA_EXCEEDED", "error": ""},
                                None, 3.0), sdk.RateLimited)
    assert api_error(429, {"errcode": "M_LIMIT_EXCEEDED", "error": ""}, None, 3.0
                     ).retry_after == 3.0  # type: ignore[attr-defined]
    # Not the API's answer: a proxy's page, an unknown code.
    assert type(api_error(502, None, None, None)) is UnexpectedAnswer
    assert type(api_error(400, {"errcode": "X_NEW", "error": ""}, None, None)) is UnexpectedAnswer


async def test_a_send_is_retried_after_429_and_503_with_the_same_message_id(
    fake_bridge: ServerFactory
) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    answers = [lambda: _error(429, "M_LIMIT_EXCEEDED", retry_after_ms=10),
               lambda: _error(503, "DMBRIDGE_BUSY"),
               lambda: web.json_response({"room_id": "!r", "event_id": "$e",
                                          "room_created": True, "duplicate": False})]

    async def put(request: web.Request) -> web.Response:
        seen.append((request.match_info["id"], await request.json()))
        return answers[len(seen) - 1]()

    url = await fake_bridge([("PUT", "/networks/chat/messages/{id}", put)])
    async with sdk.Client(url, "t", "chat") as client:
        sent = await client.send_message("bob", "@alice:example.org", "Hi")
    assert (sent.room_id, sent.event_id, sent.room_created) == ("!r", "$e", True)
    assert len(seen) == 3 and len({mid for mid, _ in seen}) == 1
    assert sent.message_id == seen[0][0] and sent.message_id.startswith("sdk-")
    assert all(body == {"sender": "bob", "recipient": "@alice:example.org", "text": "Hi"}
               for _, body in seen)


async def test_retries_are_bounded_then_the_typed_error_is_raised(
    fake_bridge: ServerFactory
) -> None:
    calls: list[str] = []

    async def limited(request: web.Request) -> web.Response:
        calls.append(request.path)
        if request.match_info["id"] == "long":  # asks to wait longer than max_wait allows
            return _error(429, "DMBRIDGE_QUOTA_EXCEEDED", {"Retry-After": "100"})
        return _error(429, "M_LIMIT_EXCEEDED", retry_after_ms=5)

    url = await fake_bridge([("PUT", "/networks/chat/messages/{id}", limited)])
    async with sdk.Client(url, "t", "chat", max_retries=2, max_wait=30) as client:
        with pytest.raises(sdk.RateLimited) as limit:
            await client.send_message("bob", "@alice:example.org", "Hi", message_id="short")
        assert len(calls) == 3 and limit.value.retry_after == 0.005
        with pytest.raises(sdk.QuotaExceeded) as quota:
            await client.send_message("bob", "@alice:example.org", "Hi", message_id="long")
        assert len(calls) == 4 and quota.value.retry_after == 100
        assert "slow down and send the same request again" in str(quota.value)


async def test_errors_that_a_retry_cannot_fix_are_raised_at_once(
    fake_bridge: ServerFactory
) -> None:
    calls: list[str] = []

    async def declined(request: web.Request) -> web.Response:
        calls.append(request.path)
        return _error(403, "DMBRIDGE_DECLINED", {"X-Request-ID": "req-abc"})

    url = await fake_bridge([("POST", "/networks/chat/dms", declined)])
    async with sdk.Client(url, "t", "chat") as client:
        with pytest.raises(sdk.Declined) as refused:
            await client.open_dm("bob", "@alice:example.org")
    assert len(calls) == 1 and refused.value.request_id == "req-abc"
    assert "fall back to another channel" in str(refused.value)


def _dm(created: bool, room_id: str) -> dict[str, Any]:
    return {"room_id": room_id, "network": "chat", "remote_id": "bob",
            "ghost_id": "@dm_chat_bob:example.org", "user_id": "@alice:example.org",
            "user_membership": "invite", "state": "active", "created": created}


async def test_create_dm_asks_for_a_new_room_and_refuses_a_bridge_that_ignores_it(
    fake_bridge: ServerFactory
) -> None:
    """With a bridge that opens a fresh DM on "new": true, create_dm gives it; with one that
    does not know the field (answers the existing DM), create_dm says so instead."""
    bodies: list[dict[str, Any]] = []

    async def supporting(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response(_dm(True, "!fresh"))

    async def ignoring(request: web.Request) -> web.Response:
        return web.json_response(_dm(False, "!old"))

    url = await fake_bridge([("POST", "/networks/chat/dms", supporting),
                             ("POST", "/networks/old/dms", ignoring)])
    async with sdk.Client(url, "t", "chat") as client:
        dm = await client.create_dm("bob", "@alice:example.org", name="Bob")
    assert (dm.room_id, dm.created, dm.is_dm) == ("!fresh", True, True)
    assert bodies == [{"sender": "bob", "recipient": "@alice:example.org", "sender_name": "Bob",
                       "new": True}]
    async with sdk.Client(url, "t", "old") as old:
        with pytest.raises(sdk.NotSupported, match="does not support opening a new DM"):
            await old.create_dm("bob", "@alice:example.org")


async def test_router_picks_the_network_by_remote_id_format(fake_bridge: ServerFactory) -> None:
    """Patterns given or discovered: one match, two (ambiguity error), none."""
    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"network": "sms", "remote_id_pattern": r"\+[1-9][0-9]{6,14}",
                                  "ghost_id_template": "@dm_sms_{remote_id}:example.org",
                                  "delivery": {"mode": "pull"}, "limits": {}})

    sends: list[str] = []

    async def send(request: web.Request) -> web.Response:
        sends.append(request.path)
        return web.json_response({"room_id": "!r", "event_id": "$e", "room_created": False,
                                  "duplicate": False})

    url = await fake_bridge([("GET", "/networks/sms", discovery),
                             ("PUT", "/networks/{network}/messages/{id}", send)])
    sms = sdk.Client(url, "t", "sms")  # its pattern comes from the bridge
    slack = sdk.Client(url, "t", "slack", remote_id_pattern=r"U[A-Z0-9]{8,}")
    numeric = sdk.Client(url, "t", "telegram", remote_id_pattern=r"\+?[0-9]{5,15}")
    router = sdk.Router([sms, slack])
    try:
        assert (await router.client_for("U1234ABCD")) is slack
        assert (await router.client_for("+15551234567")) is sms
        await router.send_message("U1234ABCD", "@alice:example.org", "Hi")
        assert sends[-1].startswith("/_dmbridge/v1/networks/slack/messages/")
        with pytest.raises(sdk.NoNetwork, match="'bob' matches the remote ID pattern of none"):
            await router.client_for("bob")
        both = sdk.Router([sms, slack, numeric])
        with pytest.raises(sdk.AmbiguousRemoteID) as ambiguous:
            await both.client_for("+15551234567")
        assert ambiguous.value.networks == ["sms", "telegram"]
        assert "pass network= to say which one" in str(ambiguous.value)
        assert (await both.client_for("+15551234567", network="telegram")) is numeric
    finally:
        await router.close()
        await numeric.close()


async def test_discovery_on_a_bridge_without_it_says_what_to_do(
    fake_bridge: ServerFactory
) -> None:
    async def unrecognized(request: web.Request) -> web.Response:
        return _error(404, "M_UNRECOGNIZED")

    url = await fake_bridge([("GET", "/networks/{network}", unrecognized)])
    async with sdk.Client(url, "t", "sms") as client:
        with pytest.raises(sdk.NotSupported, match="give remote_id_pattern= to Client"):
            await sdk.Router([client]).client_for("+15551234567")


async def test_uploads_from_bytes_a_file_and_a_stream(fake_bridge: ServerFactory,
                                                      tmp_path: Any) -> None:
    got: list[tuple[str, str | None, bytes]] = []

    async def upload(request: web.Request) -> web.Response:
        body = await request.read()
        got.append((request.content_type, request.query.get("filename"), body))
        return web.json_response({"content_uri": "mxc://x/y", "mimetype": request.content_type,
                                  "size": len(body), "filename": request.query.get("filename"),
                                  "width": None, "height": None}, status=201)

    async def chunks() -> Any:
        yield b"one,"
        yield b"two"

    url = await fake_bridge([("POST", "/networks/chat/media", upload)])
    path = tmp_path / "notes.txt"
    path.write_bytes(b"from a file")
    async with sdk.Client(url, "t", "chat") as client:
        a = await client.upload(b"bytes", content_type="text/plain")
        b = await client.upload(path, content_type="text/plain")
        c = await client.upload(chunks(), content_type="text/csv", filename="t.csv")
    assert [(g[0], g[1], g[2]) for g in got] == [
        ("text/plain", None, b"bytes"), ("text/plain", "notes.txt", b"from a file"),
        ("text/csv", "t.csv", b"one,two")]
    assert (a.size, b.filename, c.content_uri) == (5, "notes.txt", "mxc://x/y")


def test_events_parse_into_their_types() -> None:
    client = sdk.Client("http://127.0.0.1:1", "t", "chat")
    envelope = {"id": 7, "idempotency_key": "k", "network": "chat", "remote_id": "bob",
                "ghost_id": "@g:x", "user_id": "@alice:x", "room_id": "!r", "queued_at": 1}
    notice = client.event({**envelope, "type": "dm.declined",
                           "dm": {"state": "declined", "reason": "invite_rejected",
                                  "event_id": "$m"}})
    assert isinstance(notice, sdk.Notice)
    assert (notice.state, notice.reason, notice.dm.room_id) == ("declined", "invite_rejected",
                                                                "!r")
    failed = client.event({**envelope, "type": "delivery.failed", "failed": {
        "id": 3, "type": "message", "idempotency_key": "$x", "attempts": 20, "error": "e"}})
    assert isinstance(failed, sdk.DeliveryFailed) and (failed.failed_id, failed.attempts) == (
        3, 20)
    deletion = client.event({**envelope, "type": "redaction", "redaction": {
        "event_id": "$d", "target": {"event_id": "$t", "message_id": "m1", "kind": "message"},
        "reason": None, "sent_at": 5}})
    assert isinstance(deletion, sdk.Deletion) and deletion.target == sdk.Target("$t", "m1",
                                                                                 "message")
    future = client.event({**envelope, "type": "something.new"})
    assert type(future) is sdk.Event and future.raw["type"] == "something.new"
    json.dumps(future.raw)
