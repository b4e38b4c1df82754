"""Bad input gets a precise status and a Matrix-style error body, and changes nothing."""

from __future__ import annotations

import json

import pytest

from dmbridge.bridge import Bridge
from tests.integration.conftest import Platform
from tests.support.settings import CHAT_TOKEN, SMS_TOKEN

GOOD = {"sender": "+15550000001", "text": "hi"}


@pytest.fixture
async def recipient(new_human) -> str:
    return str((await new_human()).user_id)


async def test_token_errors(bridge: Bridge, platform: Platform, recipient: str) -> None:
    body = {**GOOD, "recipient": recipient}
    path = "/networks/sms/messages/x1"
    assert await platform.call("PUT", path, None, json=body) == (
        401, {"errcode": "M_MISSING_TOKEN",
              "error": "an 'Authorization: Bearer <network token>' header is required"})
    status, err = await platform.call("PUT", path, "not-a-token", json=body)
    assert (status, err["errcode"]) == (401, "M_UNKNOWN_TOKEN")
    status, err = await platform.call("PUT", path, CHAT_TOKEN, json=body)
    assert (status, err["errcode"]) == (403, "M_FORBIDDEN")
    assert "belongs to network 'chat'" in err["error"]
    status, err = await platform.call("PUT", "/networks/fax/messages/x1", SMS_TOKEN, json=body)
    assert (status, err["errcode"]) == (404, "DMBRIDGE_UNKNOWN_NETWORK")
    assert await bridge.dms.list_dms(user_id=recipient) == []


@pytest.mark.parametrize(("raw", "status", "errcode", "mentions"), [
    (b"{not json", 400, "M_NOT_JSON", "not valid JSON"),
    (b"[1, 2]", 400, "M_BAD_JSON", "JSON object"),
    (json.dumps({"sender": "+15550000001", "recipient": "@x:localhost"}).encode(), 400,
     "M_INVALID_PARAM", "needs text, html or markdown"),
    (json.dumps({**GOOD, "recipient": "@x:localhost", "text": None,
                 "html": "<script>alert(1)</script><style>p{}</style>"}).encode(), 400,
     "M_INVALID_PARAM", "no text left once its HTML is cleaned"),
    (json.dumps({**GOOD, "recipient": "@x:localhost", "html": "<b>a</b>", "markdown": "**a**"}
                ).encode(), 400, "M_INVALID_PARAM", "either html or markdown"),
    (json.dumps({**GOOD, "recipient": "@x:localhost", "msgtype": "video"}).encode(), 400,
     "M_INVALID_PARAM", "msgtype must be one of text, notice, emote"),
    (json.dumps({**GOOD, "recipient": "bob"}).encode(), 400, "M_INVALID_PARAM",
     "not a Matrix user ID"),
    (json.dumps({**GOOD, "sender": "12345", "recipient": "@x:localhost"}).encode(), 400,
     "DMBRIDGE_INVALID_REMOTE_ID", "not a valid sms user ID"),
    (json.dumps({**GOOD, "recipient": "@dm_chat_bob:localhost"}).encode(), 400,
     "M_INVALID_PARAM", "is a user of this bridge"),
    (json.dumps({**GOOD, "recipient": "@nobody-here:localhost"}).encode(), 404,
     "DMBRIDGE_UNKNOWN_RECIPIENT", "does not exist"),
    (json.dumps({**GOOD, "recipient": "@x:localhost", "text": "a" * 200_000}).encode(), 413,
     "M_TOO_LARGE", "limit"),
    (json.dumps({**GOOD, "recipient": "@x:localhost", "text": "é" * 40_000},
                ensure_ascii=False).encode(), 413,
     "M_TOO_LARGE", "fit an event"),
])
async def test_bad_requests(
    bridge: Bridge, platform: Platform, raw: bytes, status: int, errcode: str, mentions: str
) -> None:
    got_status, err = await platform.call("PUT", "/networks/sms/messages/bad", SMS_TOKEN,
                                          data=raw)
    assert (got_status, err["errcode"]) == (status, errcode), err
    assert mentions in err["error"]
    assert set(err) == {"errcode", "error"}
    # Nothing half-done: no DM, no ghost.
    assert await bridge.dms.list_dms(network_id="sms") == []
    assert await bridge.stores.ghosts.get("@dm_sms_=2b15550000001:localhost") is None  # type: ignore[arg-type]


async def test_unknown_route_and_method(bridge: Bridge, platform: Platform) -> None:
    status, err = await platform.call("GET", "/nothing-here", SMS_TOKEN)
    assert (status, err["errcode"]) == (404, "M_UNRECOGNIZED")
    status, err = await platform.call("DELETE", "/networks/sms/dms", SMS_TOKEN)
    assert (status, err["errcode"]) == (405, "M_UNRECOGNIZED")


async def test_openapi_and_health_are_served(bridge: Bridge, platform: Platform) -> None:
    async with platform.session.get(platform.base + "/openapi.yaml") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert "openapi:" in text and "/networks/{network}/messages/{message_id}" in text
    assert await platform.call("GET", "/health", None) == (200, {"status": "ok"})
