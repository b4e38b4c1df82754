"""The SDK against a fake bridge: errors, retries, create_dm, discovery and the router."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from importlib import resources
from pathlib import Path
from typing import Any

import dmbridge_client as sdk
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from dmbridge_client.errors import ERRORS, UnexpectedAnswer, api_error
from ruamel.yaml import YAML

from dmbridge.api.discovery import describe
from dmbridge.localpart import escape
from tests.support.settings import make_settings

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


def _dm(created: bool, room_id: str, replaced: str | None = None) -> dict[str, Any]:
    return {"room_id": room_id, "network": "chat", "remote_id": "bob",
            "ghost_id": "@dm_chat_bob:example.org", "user_id": "@alice:example.org",
            "user_membership": "invite", "state": "active", "created": created,
            "replaced_room_id": replaced}


class FakeDMs:
    """The DMs of one pair on a fake bridge that opens a fresh DM as the real one does: a
    'replaces' that is no longer the pair's DM is answered with the current one."""

    def __init__(self, current: str | None) -> None:
        self.current = current
        self.made: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.lose_answers = 0  # how many answers to lose after doing the work

    async def list(self, request: web.Request) -> web.Response:
        assert dict(request.query) == {"limit": "1", "user_id": "@alice:example.org",
                                       "remote_id": "bob"}
        return web.json_response({"dms": [] if self.current is None
                                  else [_dm(False, self.current)]})

    async def open(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        if self.current is None or (body.get("new") and body.get("replaces") in (
                None, self.current)):
            replaced, self.current = self.current, f"!room{len(self.made) + 1}"
            self.made.append(self.current)
            answer = _dm(True, self.current, replaced if body.get("new") else None)
        else:
            answer = _dm(False, self.current)
        if self.lose_answers:
            self.lose_answers -= 1
            assert request.transport is not None
            request.transport.close()  # the work is done, the answer never arrives
        return web.json_response(answer)


async def test_create_dm_replaces_the_current_dm_and_a_retry_makes_no_third_room(
    fake_bridge: ServerFactory
) -> None:
    """The answer of the first try is lost: the retry names the same room to replace, the
    bridge answers the room the first try made, and no other room is made. Called again
    with replaces= after that, the same room comes back."""
    dms = FakeDMs("!old")
    dms.lose_answers = 1
    url = await fake_bridge([("GET", "/networks/chat/dms", dms.list),
                             ("POST", "/networks/chat/dms", dms.open)])
    async with sdk.Client(url, "t", "chat") as client:
        dm = await client.create_dm("bob", "@alice:example.org", name="Bob")
        again = await client.create_dm("bob", "@alice:example.org", replaces="!old")
    asked = {"sender": "bob", "recipient": "@alice:example.org", "sender_name": "Bob",
             "new": True, "replaces": "!old"}
    unnamed = {k: v for k, v in asked.items() if k != "sender_name"}
    assert dms.bodies == [asked, asked, unnamed]
    assert dms.made == ["!room1"]
    assert (dm.room_id, dm.created, dm.is_dm) == ("!room1", False, True)
    assert (again.room_id, again.created, again.replaced_room_id) == ("!room1", False, None)


async def test_create_dm_without_a_dm_to_replace_opens_one_and_its_retry_finds_it(
    fake_bridge: ServerFactory
) -> None:
    dms = FakeDMs(None)
    dms.lose_answers = 1
    url = await fake_bridge([("GET", "/networks/chat/dms", dms.list),
                             ("POST", "/networks/chat/dms", dms.open)])
    async with sdk.Client(url, "t", "chat") as client:
        dm = await client.create_dm("bob", "@alice:example.org")
    assert dms.bodies == [{"sender": "bob", "recipient": "@alice:example.org"}] * 2
    assert (dms.made, dm.room_id) == (["!room1"], "!room1")


async def test_create_dm_refuses_a_bridge_that_answers_the_old_dm(
    fake_bridge: ServerFactory
) -> None:
    async def ignoring(request: web.Request) -> web.Response:
        answer = _dm(False, "!old")
        del answer["replaced_room_id"]
        return web.json_response(answer)

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"dms": [_dm(False, "!old")]})

    url = await fake_bridge([("GET", "/networks/old/dms", listing),
                             ("POST", "/networks/old/dms", ignoring)])
    async with sdk.Client(url, "t", "old") as old:
        with pytest.raises(sdk.NotSupported, match="does not support opening a new DM"):
            await old.create_dm("bob", "@alice:example.org")
        with pytest.raises(sdk.NotSupported, match="does not support opening a new DM"):
            await old.open_dm("bob", "@alice:example.org", new=True)


async def test_router_picks_the_network_by_remote_id_format(
    fake_bridge: ServerFactory, tmp_path: Path
) -> None:
    """Patterns given or discovered (the bridge's own description of its SMS network): one
    match, two (ambiguity error), none."""
    settings = make_settings(tmp_path, homeserver_url="http://127.0.0.1:1", domain="hs.test",
                             port=1, db_url=f"sqlite:///{tmp_path / 'db'}")
    network = settings.networks.get("sms")

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response(describe(network, settings))

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
        assert sms.info is not None and sms.remote_id_pattern == network.remote_id_pattern.pattern
        assert (sms.info.network, sms.info.delivery_mode, sms.info.limits.max_upload_bytes) == (
            "sms", network.delivery.mode, settings.media.max_upload_bytes)
        assert sms.info.quotas.new_dms_per_hour == network.quotas.new_dms_per_hour
        assert sms.info.ghost_user_id("+15551234567") == network.ghost_user_id("+15551234567")
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


@pytest.mark.parametrize("remote_id", ["Bob_Smith", "a.b-c/d", "+15551234567", "zoë 1"])
def test_ghost_ids_are_escaped_as_the_bridge_escapes_them(tmp_path: Path,
                                                         remote_id: str) -> None:
    settings = make_settings(tmp_path, homeserver_url="http://127.0.0.1:1", domain="hs.test",
                             port=1, db_url=f"sqlite:///{tmp_path / 'db'}")
    chat = settings.networks.get("chat")
    info = sdk.NetworkInfo.from_json(describe(chat, settings))
    assert sdk.escape_remote_id(remote_id) == escape(remote_id)
    if info.matches(remote_id):
        assert info.ghost_user_id(remote_id) == chat.ghost_user_id(remote_id)


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


async def test_a_reply_stays_in_the_thread_and_times_are_sent_in_milliseconds(
    fake_bridge: ServerFactory
) -> None:
    """message.reply to a message in a thread names its root (the platform's own root by
    message ID, a Matrix user's by event ID); a reply outside threads names none. ts: a
    datetime in any zone, or milliseconds."""
    bodies: list[dict[str, Any]] = []

    async def put(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response({"room_id": "!r", "event_id": "$e", "room_created": False,
                                  "duplicate": False})

    url = await fake_bridge([("PUT", "/networks/chat/messages/{id}", put)])
    envelope = {"type": "message", "network": "chat", "remote_id": "bob",
                "user_id": "@alice:x", "room_id": "!r", "queued_at": 1}

    def message(number: int, thread_root: dict[str, Any] | None) -> dict[str, Any]:
        return {**envelope, "id": number, "idempotency_key": f"$m{number}", "message": {
            "event_id": f"$m{number}", "text": "?", "reply_to": None,
            "thread_root": thread_root}}

    async with sdk.Client(url, "t", "chat") as client:
        ours = client.event(message(1, {"event_id": "$root", "message_id": "m-root",
                                        "kind": "message"}))
        theirs = client.event(message(2, {"event_id": "$theirs", "message_id": None,
                                          "kind": "message"}))
        outside = client.event(message(3, None))
        unseen = client.event(message(4, {"event_id": "$unseen", "message_id": None,
                                          "kind": "unknown"}))
        assert isinstance(ours, sdk.DirectMessage) and ours.thread_root == sdk.Target(
            "$root", "m-root", "message")
        for event in (ours, theirs, outside, unseen):
            assert isinstance(event, sdk.DirectMessage)
            await event.reply("!")
        zoned = datetime(2026, 1, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
        await client.send_message("bob", "@alice:x", "late", ts=zoned)
        await client.send_message("bob", "@alice:x", "late", ts=1767225540007)
    assert [(b.get("thread_root"), b["reply_to"]) for b in bodies[:4]] == [
        ({"message_id": "m-root"}, {"event_id": "$m1"}),
        ({"event_id": "$theirs"}, {"event_id": "$m2"}),
        (None, {"event_id": "$m3"}), (None, {"event_id": "$m4"})]
    assert "thread_root" not in bodies[2] and "thread_root" not in bodies[3]
    assert [b["ts"] for b in bodies[4:]] == [1767268800123, 1767225540007]


async def test_typing_block_raises_its_own_error_when_refresh_and_stop_fail(
    fake_bridge: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    typings: list[bool] = []
    refused = asyncio.Event()

    async def open_dm(request: web.Request) -> web.Response:
        return web.json_response(_dm(True, "!r"))

    async def typing(request: web.Request) -> web.Response:
        typings.append((await request.json())["typing"])
        if len(typings) == 1:
            return web.json_response({})
        if typings[-1]:  # the refresh: refused for good
            refused.set()
            return _error(429, "M_LIMIT_EXCEEDED", {"Retry-After": "100"})
        return _error(500, "M_UNKNOWN")  # stopping fails too

    url = await fake_bridge([("POST", "/networks/chat/dms", open_dm),
                             ("PUT", "/networks/chat/typing", typing)])
    async with sdk.Client(url, "t", "chat", max_wait=1) as client:
        dm = await client.open_dm("bob", "@alice:example.org")
        with pytest.raises(ValueError, match="the handler's own"):
            async with dm.typing(show_for=0.01):
                await refused.wait()
                await asyncio.sleep(0.05)  # the refresh task has failed by now
                raise ValueError("the handler's own")
    assert typings[0] is True and typings[-1] is False
    assert "could not keep bob typing in !r: 429 M_LIMIT_EXCEEDED" in caplog.text
    assert "could not stop bob typing in !r: 500 M_UNKNOWN" in caplog.text


async def test_retry_after_as_a_date_or_on_a_503_or_a_proxy_429_is_honoured(
    fake_bridge: ServerFactory
) -> None:
    calls: list[str] = []

    def http_date(seconds_from_now: float) -> str:
        return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now),
                               usegmt=True)

    async def put(request: web.Request) -> web.Response:
        mid = request.match_info["id"]
        calls.append(mid)
        if mid == "busy-long":  # asks for longer than max_wait: raised without a retry
            return _error(503, "DMBRIDGE_BUSY", {"Retry-After": http_date(100)})
        if mid == "proxy-long":  # a proxy's 429 with no JSON body
            return web.Response(status=429, text="slow down", headers={"Retry-After": "100"})
        if calls.count(mid) == 1:  # a date already past: sent again at once
            return _error(503, "DMBRIDGE_BUSY", {"Retry-After": http_date(-10)})
        return web.json_response({"room_id": "!r", "event_id": "$e", "room_created": False,
                                  "duplicate": False})

    url = await fake_bridge([("PUT", "/networks/chat/messages/{id}", put)])
    async with sdk.Client(url, "t", "chat", max_wait=30) as client:
        with pytest.raises(sdk.APIError) as busy:
            await client.send_message("bob", "@alice:example.org", "Hi", message_id="busy-long")
        assert busy.value.status == 503 and calls == ["busy-long"]
        with pytest.raises(UnexpectedAnswer) as proxy:
            await client.send_message("bob", "@alice:example.org", "Hi",
                                      message_id="proxy-long")
        assert proxy.value.status == 429 and calls[1:] == ["proxy-long"]
        sent = await client.send_message("bob", "@alice:example.org", "Hi", message_id="past")
        assert sent.event_id == "$e" and calls[2:] == ["past", "past"]


async def test_answers_the_client_cannot_read_are_raised_as_its_own_errors(
    fake_bridge: ServerFactory
) -> None:
    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>Welcome</html>", content_type="text/html",
                            headers={"X-Request-ID": "req-html"})

    async def shapeless(request: web.Request) -> web.Response:
        return web.json_response({"rooms": []}, headers={"X-Request-ID": "req-shape"})

    async def cut_short(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b'{"room_id": ')
        assert request.transport is not None
        request.transport.close()
        return resp

    url = await fake_bridge([("PUT", "/networks/chat/messages/{id}", html),
                             ("POST", "/networks/chat/dms", shapeless),
                             ("GET", "/networks/chat/dms", cut_short)])
    async with sdk.Client(url, "t", "chat", max_retries=1) as client:
        with pytest.raises(UnexpectedAnswer) as not_json:
            await client.send_message("bob", "@alice:example.org", "Hi")
        assert not_json.value.status == 200 and not_json.value.request_id == "req-html"
        assert "text/html answer the client cannot read" in str(not_json.value)
        with pytest.raises(UnexpectedAnswer) as wrong_shape:
            await client.open_dm("bob", "@alice:example.org")
        assert wrong_shape.value.request_id == "req-shape" and "KeyError" in str(
            wrong_shape.value)
        with pytest.raises(sdk.ConnectionFailed, match="after 2 attempt"):
            await client.list_dms()


async def test_notify_run_again_after_a_failure_posts_nothing_twice(
    fake_bridge: ServerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location(
        "notify_example", Path(__file__).parents[2] / "examples" / "notify.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    posted: dict[str, str] = {}  # message ID -> recipient, as the bridge keeps them
    down = {"@bob:example.org"}

    async def put(request: web.Request) -> web.Response:
        recipient = (await request.json())["recipient"]
        if recipient in down:
            assert request.transport is not None
            request.transport.close()  # that user's send never gets through
        posted.setdefault(request.match_info["id"], recipient)
        return web.json_response({"room_id": "!r", "event_id": "$e", "room_created": False,
                                  "duplicate": False})

    users = ["@alice:example.org", "@bob:example.org"]
    url = await fake_bridge([("PUT", "/networks/chat/messages/{id}", put)])
    async with sdk.Client(url, "t", "chat", max_retries=0) as client:
        assert await example.notify(client, "parcels", None, "It arrived", users) == 1
        assert "failed @bob:example.org: " in capsys.readouterr().err
        down.clear()
        assert await example.notify(client, "parcels", None, "It arrived", users) == 0
        assert await example.notify(client, "parcels", None, "It arrived", users,
                                    key="2nd") == 0
    assert sorted(posted.values()) == sorted(users * 2)  # once each per key, not per run


async def test_download_sends_the_token_to_the_bridge_only(
    fake_bridge: ServerFactory, aiohttp_server: Any
) -> None:
    tokens: list[str | None] = []

    async def media(request: web.Request) -> web.Response:
        tokens.append(request.headers.get("Authorization"))
        return web.Response(body=b"file")

    elsewhere = web.Application()
    elsewhere.router.add_get("/file", media)
    other: TestServer = await aiohttp_server(elsewhere)
    url = await fake_bridge([("GET", "/networks/chat/media/{server}/{id}", media)])
    async with sdk.Client(url, "secret", "chat") as client:
        assert await client.download(url + "/_dmbridge/v1/networks/chat/media/x/y?sig=1") \
            == b"file"
        assert await client.download(str(other.make_url("/file"))) == b"file"
    assert tokens == ["Bearer secret", None]


async def test_a_network_whose_description_fails_is_left_out_of_routing(
    fake_bridge: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    asked: list[str] = []

    async def broken(request: web.Request) -> web.Response:
        asked.append(request.path)
        return _error(500, "M_UNKNOWN")

    url = await fake_bridge([("GET", "/networks/sms", broken)])
    sms = sdk.Client(url, "t", "sms", max_retries=0)
    slack = sdk.Client(url, "t", "slack", remote_id_pattern=r"U[A-Z0-9]{8,}")
    router = sdk.Router([sms, slack])
    try:
        assert (await router.client_for("U1234ABCD")) is slack
        assert (await router.client_for("U5678EFGH")) is slack
        assert asked == ["/_dmbridge/v1/networks/sms"]  # asked once, not on every call
        assert "left network sms out of routing: describing it failed: 500" in caplog.text
        with pytest.raises(sdk.NoNetwork, match=r"not described: sms"):
            await router.client_for("+15551234567")
        assert (await router.client_for("+15551234567", network="sms")) is sms
        assert len(asked) == 1
    finally:
        await router.close()


async def test_a_send_retried_after_a_lost_connection_keeps_its_message_id(
    fake_bridge: ServerFactory
) -> None:
    ids: list[str] = []

    async def put(request: web.Request) -> web.Response:
        ids.append(request.match_info["id"])
        if len(ids) == 1:  # the message is posted, the answer is lost
            assert request.transport is not None
            request.transport.close()
        return web.json_response({"room_id": "!r", "event_id": "$e", "room_created": False,
                                  "duplicate": len(ids) > 1})

    url = await fake_bridge([("PUT", "/networks/chat/messages/{id}", put)])
    async with sdk.Client(url, "t", "chat") as client:
        sent = await client.send_message("bob", "@alice:example.org", "Hi")
    assert len(ids) == 2 and ids[0] == ids[1] == sent.message_id
    assert sent.event_id == "$e"


async def test_an_upload_from_an_open_file_is_sent_whole_again_and_the_file_stays_open(
    fake_bridge: ServerFactory, tmp_path: Path
) -> None:
    bodies: list[bytes] = []

    async def upload(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        if len(bodies) == 1:
            return _error(503, "DMBRIDGE_BUSY", {"Retry-After": "0"})
        return web.json_response({"content_uri": "mxc://hs/abc", "mimetype": "image/png",
                                  "size": len(bodies[-1])})

    path = tmp_path / "picture.png"
    path.write_bytes(b"header" + b"\x00" * 200_000 + b"end")
    url = await fake_bridge([("POST", "/networks/chat/media", upload)])
    async with sdk.Client(url, "t", "chat") as client:
        with path.open("rb") as file:
            file.read(6)  # the caller sends from here on
            uploaded = await client.upload(file, content_type="image/png")
            assert not file.closed and file.read() == b""
    assert uploaded.content_uri == "mxc://hs/abc"
    assert bodies == [path.read_bytes()[6:]] * 2
