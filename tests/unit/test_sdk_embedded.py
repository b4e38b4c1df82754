"""dmbridge.embedded: the SDK client of a bridge in the same process, and its errors."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dmbridge_client as sdk
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from dmbridge_client.backend import ROUTES as SDK_ROUTES
from dmbridge_client.errors import ERRORS, api_error
from prometheus_client import generate_latest

from dmbridge import errors
from dmbridge.api.app import ROUTES, error_boundary
from dmbridge.api.inflight import InFlight
from dmbridge.bridge import Bridge
from dmbridge.embedded import InProcess, client_for, listener_url
from dmbridge.metrics import Metrics
from tests.support.settings import CHAT_TOKEN, SMS_TOKEN, make_settings


def _settings(tmp_path: Path) -> Any:
    return make_settings(tmp_path, homeserver_url="http://127.0.0.1:1", domain="hs.test",
                         port=29340, db_url=f"sqlite:///{tmp_path / 'db'}")


@pytest.mark.parametrize(("hostname", "base"), [
    ("127.0.0.1", "http://127.0.0.1:{port}"),
    ("0.0.0.0", "http://127.0.0.1:{port}"),
    ("::", "http://[::1]:{port}"),
    ("::1", "http://[::1]:{port}"),
    ("fd00::5", "http://[fd00::5]:{port}"),
])
async def test_over_http_the_client_reaches_the_listener_at_a_url_it_can_use(
    tmp_path: Path, hostname: str, base: str
) -> None:
    settings = _settings(tmp_path)
    settings = SimpleNamespace(hostname=hostname, port=settings.port,
                               networks=settings.networks)
    assert listener_url(settings) == base.format(port=29340)
    client = client_for(SimpleNamespace(settings=settings), "chat",  # type: ignore[arg-type]
                        over_http=True)
    try:
        assert isinstance(client.backend, sdk.Transport)
        assert client.backend.base == base.format(port=29340) + "/_dmbridge/v1"
        assert client.backend.headers == {"Authorization": f"Bearer {CHAT_TOKEN}"}
    finally:
        await client.close()


def _bridge_errors() -> list[type[errors.BridgeError]]:
    found: list[type[errors.BridgeError]] = []
    pending = [errors.BridgeError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def _instance(cls: type[errors.BridgeError]) -> errors.BridgeError:
    if issubclass(cls, errors.RateLimited):
        return cls("slow down", 2.5)
    return cls("refused")


async def _over_http(error: Exception) -> sdk.APIError:
    """The exception the HTTP client raises when a handler raises ``error``."""
    async def fail(_: web.Request) -> web.Response:
        raise error

    app = web.Application(middlewares=[error_boundary])
    app.router.add_get("/", fail)
    async with TestClient(TestServer(app)) as http:
        resp = await http.get("/")
        body = await resp.json()
        header = resp.headers.get("Retry-After")
        return api_error(resp.status, body, None, float(header) if header else None)


async def _in_process(error: Exception) -> sdk.APIError:
    async def fail() -> None:
        raise error

    with pytest.raises(sdk.APIError) as raised:
        await InProcess(lambda: None, "", "")._checked(  # type: ignore[arg-type,return-value]
            "sendMessage", fail)
    return raised.value


@pytest.mark.parametrize("cls", _bridge_errors(), ids=lambda c: c.__name__)
async def test_every_bridge_error_raises_the_same_sdk_exception_as_over_http(
    cls: type[errors.BridgeError]
) -> None:
    over_http = await _over_http(_instance(cls))
    in_process = await _in_process(_instance(cls))
    assert type(in_process) is type(over_http)
    assert (in_process.status, in_process.code, in_process.error) == (
        over_http.status, over_http.code, over_http.error)
    assert cls is errors.BridgeError or type(in_process) is ERRORS[cls.errcode]
    assert in_process.request_id is not None and in_process.request_id.startswith("req-")


async def test_a_refusal_to_wait_keeps_its_exact_time_in_process() -> None:
    refused = await _in_process(errors.QuotaExceeded("the network's quota", 2.5))
    assert isinstance(refused, sdk.QuotaExceeded) and refused.retry_after == 2.5
    assert "slow down and send the same request again" in str(refused)


async def test_a_bug_is_an_internal_error_with_a_reference_to_the_log(
    caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, "dmbridge.api"):
        refused = await _in_process(ZeroDivisionError("division by zero"))
    assert isinstance(refused, sdk.ServerError) and refused.status == 500
    ref = refused.error.split("ref ")[1].split(",")[0]
    [record] = [r for r in caplog.records if ref in r.getMessage()]
    assert record.getMessage() == f"sendMessage (in process) failed (ref {ref})"
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError


class _Recorded:
    """Operations that record what they are asked to perform, and answer as a send does."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.performed: list[tuple[str, str, dict[str, Any]]] = []
        self.answered = asyncio.Event()
        self.in_flight = InFlight()

    def charge(self, name: str, network: Any) -> None:
        pass

    async def perform(self, name: str, request: Any, *, charged: bool = False
                      ) -> dict[str, Any]:
        self.performed.append((name, request.network.id, request.body))
        self.answered.set()
        return {"room_id": "!dm:hs.test", "event_id": "$sent", "room_created": False,
                "duplicate": False}


def _client_over(ops: _Recorded, token: str = CHAT_TOKEN, **options: Any) -> sdk.Client:
    backend = InProcess(lambda: ops, token, "http://127.0.0.1:1",  # type: ignore[arg-type,return-value]
                        **options)
    return sdk.Client("http://127.0.0.1:1", token, "chat", backend=backend)


def _in_process_client(tmp_path: Path, token: str = CHAT_TOKEN) -> tuple[sdk.Client, _Recorded]:
    ops = _Recorded(_settings(tmp_path))
    return _client_over(ops, token), ops


async def test_a_body_the_listener_would_refuse_as_too_large_is_refused_in_process(
    tmp_path: Path
) -> None:
    client, ops = _in_process_client(tmp_path)
    sent = await client.send_message("bob", "@alice:hs.test", "😀" * 1000)
    assert (sent.event_id, ops.performed[0][:2]) == ("$sent", ("sendMessage", "chat"))
    with pytest.raises(sdk.TooLarge) as refused:
        await client.send_message("bob", "@alice:hs.test", "😀" * 12000)  # 144 kB as JSON
    assert refused.value.status == 413
    assert refused.value.error.endswith(f"the limit is {ops.settings.max_body_bytes}")
    assert len(ops.performed) == 1


async def test_another_networks_token_is_refused_in_process_as_over_http(
    tmp_path: Path
) -> None:
    client, ops = _in_process_client(tmp_path, token=SMS_TOKEN)
    with pytest.raises(sdk.Forbidden, match="belongs to network 'sms', not 'chat'"):
        await client.send_message("bob", "@alice:hs.test", "Hello")
    assert ops.performed == []


class _Scripted(_Recorded):
    """Operations that first raise the given errors, then answer as a send does; a send may
    be held until released."""

    def __init__(self, settings: Any, *failures: Exception) -> None:
        super().__init__(settings)
        self.failures = list(failures)
        self.release: asyncio.Event | None = None

    async def perform(self, name: str, request: Any, *, charged: bool = False
                      ) -> dict[str, Any]:
        if self.release is not None:
            await self.release.wait()
        if self.failures:
            self.performed.append((name, "refused", request.body))
            raise self.failures.pop(0)
        return await super().perform(name, request, charged=charged)


async def test_in_process_calls_are_performed_again_after_429_and_503_as_over_http(
    tmp_path: Path
) -> None:
    ops = _Scripted(_settings(tmp_path), errors.RateLimited("slow down", 0.01),
                    errors.Busy("the DM is being opened"))
    client = _client_over(ops)
    sent = await client.send_message("bob", "@alice:hs.test", "Hello", message_id="m1")
    assert sent.event_id == "$sent"
    assert [p[1] for p in ops.performed] == ["refused", "refused", "chat"]

    ops.failures = [errors.Declined("no")] * 3
    with pytest.raises(sdk.Declined):
        await client.send_message("bob", "@alice:hs.test", "Hello", message_id="m2")
    assert len(ops.failures) == 2  # a refusal that retrying cannot change: once


async def test_a_cancelled_caller_leaves_the_send_to_finish_as_over_http(
    tmp_path: Path
) -> None:
    ops = _Scripted(_settings(tmp_path))
    ops.release = asyncio.Event()
    client = _client_over(ops)
    sending = asyncio.create_task(client.send_message("bob", "@alice:hs.test", "Hello"))
    await asyncio.sleep(0)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    assert ops.performed == []
    ops.release.set()
    await asyncio.wait_for(ops.answered.wait(), 10)
    assert [(name, network) for name, network, _ in ops.performed] == [("sendMessage", "chat")]


async def test_a_stopping_bridge_waits_for_a_send_whose_caller_went_away_then_refuses_calls(
    tmp_path: Path
) -> None:
    ops = _Scripted(_settings(tmp_path))
    ops.release = asyncio.Event()
    client = _client_over(ops, max_retries=0)
    sending = asyncio.create_task(client.send_message("bob", "@alice:hs.test", "Hello"))
    await asyncio.sleep(0)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    closing = asyncio.create_task(ops.in_flight.close())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done() and ops.performed == []
    ops.release.set()
    await closing
    assert [(name, network) for name, network, _ in ops.performed] == [("sendMessage", "chat")]

    with pytest.raises(sdk.NotReady) as refused:
        await client.send_message("bob", "@alice:hs.test", "Hello again")
    assert refused.value.status == 503 and refused.value.error == "the bridge is stopping"
    assert len(ops.performed) == 1


async def test_a_client_made_before_the_bridge_starts_is_refused_as_not_ready_until_then(
    tmp_path: Path
) -> None:
    bridge = Bridge(_settings(tmp_path))
    client = client_for(bridge, "chat", max_retries=0)
    try:
        with pytest.raises(sdk.NotReady) as refused:
            await client.send_message("bob", "@alice:hs.test", "Hello")
        assert refused.value.status == 503
        assert refused.value.error == "the bridge is not started"
    finally:
        await client.close()


async def test_an_in_process_call_that_gets_no_answer_in_time_fails_as_over_http(
    tmp_path: Path
) -> None:
    ops = _Scripted(_settings(tmp_path))
    ops.release = asyncio.Event()  # never set: the homeserver hangs
    client = _client_over(ops, max_retries=0, timeout=0.05)
    with pytest.raises(sdk.ConnectionFailed, match="no answer in time"):
        await client.send_message("bob", "@alice:hs.test", "Hello")
    assert ops.performed == []
    ops.release.set()
    await ops.in_flight.close()  # the send begun still ends
    assert [(name, network) for name, network, _ in ops.performed] == [("sendMessage", "chat")]


async def test_an_upload_whose_caller_is_cancelled_stops_reading_the_callers_file(
    tmp_path: Path
) -> None:
    ops = _Scripted(_settings(tmp_path))
    ops.release = asyncio.Event()
    client = _client_over(ops)
    uploading = asyncio.create_task(client.upload(b"%PDF-1.4", content_type="application/pdf"))
    await asyncio.sleep(0)
    uploading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await uploading
    ops.release.set()
    await ops.in_flight.close()
    assert ops.performed == []


class _Storing(_Recorded):
    """Operations that store an upload's bytes, as they arrive."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.stored: list[bytes] = []

    async def perform(self, name: str, request: Any, *, charged: bool = False
                      ) -> dict[str, Any]:
        async for chunk in request.content:
            self.stored.append(chunk)
        return {"content_uri": "mxc://hs.test/f", "mimetype": request.content_type,
                "size": sum(map(len, self.stored)), "filename": request.query.get("filename"),
                "width": None, "height": None}


async def test_an_upload_from_a_path_is_read_while_the_bridge_goes_on_working(
    tmp_path: Path
) -> None:
    """The file is read beside the event loop, not on it: the bridge (here, setting an event)
    goes on while the upload waits for the file's second part."""
    pipe = tmp_path / "scan.pdf"
    os.mkfifo(pipe)
    loop_ran = threading.Event()
    seen: list[bool] = []

    def write() -> None:
        with pipe.open("wb") as w:
            w.write(b"%PDF-1.4 first part\n")
            w.flush()
            seen.append(loop_ran.wait(10))  # bounded: a blocked loop must not hang the test
            w.write(b"second part\n")

    writer = threading.Thread(target=write)
    writer.start()
    ops = _Storing(_settings(tmp_path))
    client = _client_over(ops)
    uploading = asyncio.create_task(client.upload(pipe, content_type="application/pdf"))
    asyncio.get_running_loop().call_soon(loop_ran.set)
    upload = await uploading
    await asyncio.to_thread(writer.join)
    assert seen == [True]
    assert b"".join(ops.stored) == b"%PDF-1.4 first part\nsecond part\n"
    assert (upload.size, upload.filename) == (32, "scan.pdf")


async def test_in_process_calls_are_counted_by_operation_and_status(tmp_path: Path) -> None:
    ops = _Scripted(_settings(tmp_path), errors.Declined("no"))
    metrics = Metrics()
    client = _client_over(ops, metrics=metrics)
    with pytest.raises(sdk.Declined):
        await client.send_message("bob", "@alice:hs.test", "Hello", message_id="m1")
    await client.send_message("bob", "@alice:hs.test", "Hello", message_id="m2")
    await client.send_message("bob", "@alice:hs.test", "Hello", message_id="m3")

    def calls(status: str) -> float | None:
        return metrics.registry.get_sample_value(
            "dmbridge_in_process_calls_total", {"operation": "sendMessage", "status": status})

    assert (calls("403"), calls("200")) == (1.0, 2.0)
    assert metrics.registry.get_sample_value(
        "dmbridge_in_process_call_duration_seconds_count", {"operation": "sendMessage"}) == 3.0
    text = generate_latest(metrics.registry).decode()
    assert 'dmbridge_in_process_calls_total{operation="sendMessage",status="200"} 2.0' in text


def test_the_sdk_routes_every_call_where_the_bridge_serves_it() -> None:
    assert SDK_ROUTES == ROUTES
