"""Input from outside, by rule: JSON nesting, unstorable text, homeserver events and fields."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from dmbridge import jsontext, payloads
from dmbridge.api.app import error_boundary
from dmbridge.api.body import MAX_JSON_DEPTH, read_object
from dmbridge.matrix import unstorable

DEEP = b"[" * 990 + b"]" * 990


@pytest.mark.parametrize(("text", "depth"), [
    (b'"[[["', 0), (b"1", 0), (b"{}", 1), (b'{"a": [1, {"b": "]]]}"}]}', 3),
    (b'["\\"[", [[]]]', 3), (DEEP, 990),
])
def test_nesting_depth_counts_brackets_outside_strings(text: bytes, depth: int) -> None:
    assert jsontext.nesting_depth(text) == depth


def test_too_deep_json_is_refused_before_parsing() -> None:
    with pytest.raises(jsontext.TooDeep):
        jsontext.loads(DEEP, 32)
    assert jsontext.loads(b"[" * 32 + b"]" * 32, 32) is not None


def test_a_transaction_keeps_its_shallow_events_and_marks_the_deep_one() -> None:
    raw = json.dumps({"events": [{"event_id": "$a", "content": {"x": [1, "]"]}},
                                 {"event_id": "$b", "content": "DEEP"},
                                 {"event_id": "$c", "content": {}}]}).encode()
    body, cut = jsontext.loads_cut(raw.replace(b'"DEEP"', DEEP), 128)
    assert cut
    first, second, third = body["events"]
    assert first == {"event_id": "$a", "content": {"x": [1, "]"]}} and third["event_id"] == "$c"
    assert not jsontext.holds_cut(first) and jsontext.holds_cut(second)
    assert unstorable(second) == "nested too deep" and unstorable(first) is None
    assert jsontext.loads_cut(raw, 128) == (json.loads(raw), False)


def test_unstorable_text_is_replaced_keys_included() -> None:
    assert jsontext.scrub({"a\x00": ["\ud800x", "ok", 1, None]}) == {
        "a\ufffd": ["\ufffdx", "ok", 1, None]}
    assert jsontext.may_hold_unstorable(b'"\\u0000"')
    assert jsontext.may_hold_unstorable(b'"\\uDbff"')
    assert not jsontext.may_hold_unstorable('"é😀"'.encode())


@pytest.mark.parametrize(("event", "problem"), [
    ({"event_id": "$ok", "room_id": "!r", "sender": "@u:hs", "state_key": ""}, None),
    ({"event_id": "$a\x00"}, "event_id holds NUL or a lone surrogate"),
    ({"event_id": "$\udc80"}, "event_id holds NUL or a lone surrogate"),
    ({"event_id": "$" + "x" * 2800}, "event_id is longer than 255 bytes"),
    ({"event_id": "$" + "é" * 128}, "event_id is longer than 255 bytes"),
    ({"event_id": 5}, "event_id is not a non-empty string"),
    ({"room_id": "!r"}, "event_id is not a non-empty string"),
    ({"event_id": "$a", "type": "m.room.member", "state_key": "@u\x00"},
     "state_key holds NUL or a lone surrogate"),
    ({"event_id": "$a", "type": "m.room.member", "state_key": ""},
     "state_key is not a non-empty string"),
    ({"event_id": "$a", "type": "org.example.state", "state_key": "k" * 1000}, None),
    ({"event_id": "$a", "sender": ["@u"]}, "sender is not a non-empty string"),
    ([], "not an object"),
])
def test_events_with_ids_the_bridge_cannot_store_are_named(event: Any, problem: str | None
                                                          ) -> None:
    assert unstorable(event) == problem


def test_homeserver_numbers_reach_platforms_only_when_they_are_numbers() -> None:
    lane = payloads.Lane("sms", "+1555", "@u:hs", "@dm:hs")
    for raw_ts, sent_at in [("x", None), (True, None), (-1, None), (2**53, None), (1.5, None),
                            (1767225600001, 1767225600001)]:
        raw = {"event_id": "$e", "type": "m.room.message", "origin_server_ts": raw_ts,
               "content": {"msgtype": "m.text", "body": "hi"}}
        assert payloads.message(lane, "!r", raw, None, 1)["message"]["sent_at"] == sent_at
        assert payloads.reaction(lane, "!r", raw, "k", {}, 1)["reaction"]["sent_at"] == sent_at
        assert payloads.read(lane, "!r", "$e", "m1", raw_ts, 1)["read"]["ts"] == sent_at
    media = {"event_id": "$e", "type": "m.room.message", "content": {
        "msgtype": "m.image", "body": "a.png", "url": "mxc://hs/abc",
        "info": {"size": "12", "w": 10**30, "h": 5}}}
    got = payloads.message(lane, "!r", media, None, 1)["message"]["media"]
    assert (got["size"], got["width"], got["height"]) == (None, None, 5)


async def _echo(request: web.Request) -> web.Response:
    return web.json_response(await read_object(request, 131072))


async def test_request_bodies_nested_too_deep_or_in_a_bogus_charset(aiohttp_client: Any
                                                                     ) -> None:
    app = web.Application(middlewares=[error_boundary])
    app.router.add_post("/x", _echo)
    client: TestClient = await aiohttp_client(app)
    resp = await client.post("/x", data=b'{"a": ' + DEEP + b"}")
    assert resp.status == 400
    assert await resp.json() == {"errcode": "M_BAD_JSON", "error":
                                 f"the request body nests deeper than {MAX_JSON_DEPTH} levels"}
    resp = await client.post("/x", data='{"a": "é"}'.encode(),
                             headers={"Content-Type": "application/json; charset=bogus"})
    assert (resp.status, await resp.json()) == (200, {"a": "é"})
    resp = await client.post("/x", data=b'{"a": "\xff"}')
    assert (resp.status, (await resp.json())["errcode"]) == (400, "M_NOT_JSON")
    resp = await client.post("/x", data=b'{"a": "\\u0000"}')
    assert (resp.status, await resp.json()) == (200, {"a": "\x00"})  # fields are checked later
    resp = await client.put("/x", data=b"{}")
    assert resp.status == 405 and resp.headers["Allow"] == "POST"
    assert (await resp.json())["errcode"] == "M_UNRECOGNIZED"
