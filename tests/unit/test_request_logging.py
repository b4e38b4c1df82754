"""Request IDs on log lines (text and JSON), through background tasks, and on answers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import uuid

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from dmbridge import requestid
from dmbridge.logfilter import RepeatFilter
from dmbridge.logformat import JsonFormatter, TextFormatter
from dmbridge.requestid import RequestIdFilter


def _logger(fmt: logging.Formatter) -> tuple[logging.Logger, io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger(f"dmbridge.test.{uuid.uuid4().hex[:8]}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger, stream, handler


async def _serve(logger: logging.Logger) -> TestClient[web.Request, web.Application]:
    """An app as the bridge's listener has it: request IDs outermost; a handler that logs,
    and starts background work that logs later."""
    done = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        logger.info("handling %s", request.match_info["name"])

        async def later() -> None:
            await asyncio.sleep(0)
            logger.warning("background work for %s", request.match_info["name"])
            done.set()

        task = asyncio.create_task(later())
        await done.wait()
        done.clear()
        await task
        return web.json_response({})

    app = web.Application()
    requestid.install(app)
    app.router.add_get("/hello/{name}", handle)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_json_lines_carry_the_request_id_of_what_caused_them() -> None:
    logger, stream, _ = _logger(JsonFormatter())
    logger.info("before any request")
    client = await _serve(logger)
    try:
        resp = await client.get("/hello/ann", headers={"X-Request-ID": "plat-7"})
        assert resp.headers["X-Request-ID"] == "plat-7"
        resp = await client.get("/hello/bob")
        made_up = resp.headers["X-Request-ID"]
    finally:
        await client.close()
    logger.info("after")
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["message"], e["request_id"]) for e in entries] == [
        ("before any request", None),
        ("handling ann", "plat-7"),
        ("background work for ann", "plat-7"),
        ("handling bob", made_up),
        ("background work for bob", made_up),
        ("after", None),
    ]
    assert re.fullmatch(r"req-[0-9a-f]{12}", made_up)
    assert entries[2]["level"] == "WARNING" and entries[2]["logger"] == logger.name
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entries[0]["time"])


async def test_text_lines_put_the_request_id_before_the_message() -> None:
    logger, stream, _ = _logger(TextFormatter())
    client = await _serve(logger)
    try:
        await client.get("/hello/ann", headers={"X-Request-ID": "plat-8"})
    finally:
        await client.close()
    logger.info("outside")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(f" INFO {logger.name}: [plat-8] handling ann"), lines
    assert lines[1].endswith(f" WARNING {logger.name}: [plat-8] background work for ann")
    assert lines[2].endswith(f" INFO {logger.name}: outside")


async def test_an_unusable_incoming_id_is_replaced() -> None:
    logger, _, _ = _logger(TextFormatter())
    client = await _serve(logger)
    try:
        for bad in ("has space", "x" * 129, "new\\nline", "ünïcode"):
            resp = await client.get("/hello/x", headers={"X-Request-ID": bad})
            assert re.fullmatch(r"req-[0-9a-f]{12}", resp.headers["X-Request-ID"]), bad
        resp = await client.get("/nowhere")
        assert resp.status == 404 and resp.headers["X-Request-ID"].startswith("req-")
    finally:
        await client.close()


async def test_transactions_get_an_id_with_the_homeservers_transaction_id() -> None:
    async def txn(request: web.Request) -> web.Response:
        return web.json_response({"id": requestid.current()})

    app = web.Application()
    requestid.install(app)
    app.router.add_put("/_matrix/app/v1/transactions/{transaction_id}", txn)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        resp = await client.put("/_matrix/app/v1/transactions/42")
        body = await resp.json()
        resp2 = await client.put("/_matrix/app/v1/transactions/42")
        again = await resp2.json()
    finally:
        await client.close()
    assert re.fullmatch(r"txn-42-[0-9a-f]{6}", body["id"])
    assert resp.headers["X-Request-ID"] == body["id"]
    assert again["id"] != body["id"]  # a resent transaction is another request


def test_json_lines_hold_the_traceback_and_stay_one_line() -> None:
    logger, stream, _ = _logger(JsonFormatter())
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("it failed: %s", "multi\nline \udcff")
    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "it failed: multi\nline \udcff"
    assert "ValueError: bad" in entry["exception"]
    assert entry["request_id"] is None


def test_repeat_summaries_belong_to_no_request() -> None:
    logger, stream, handler = _logger(JsonFormatter())
    repeat = RepeatFilter(handler.handle, limit=1, interval=60)
    handler.addFilter(repeat)
    token = requestid._current.set("req-abc")
    try:
        for _ in range(3):
            logger.warning("the same line")
        repeat.flush(force=True)
    finally:
        requestid._current.reset(token)
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["request_id"] for e in entries] == ["req-abc", None]
    assert entries[1]["message"].startswith("suppressed 2 similar lines")
