"""Hostile or odd input, from platforms and from the homeserver: a precise answer, never a 5xx,
and one bad homeserver event never holds up the events behind it (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import pytest

from dmbridge.bridge import Bridge
from tests.integration.conftest import Homeserver, Platform, accept_dm, bridge_sees
from tests.support.feed import Feed
from tests.support.settings import CHAT_TOKEN, HS_TOKEN, SMS_TOKEN


async def _put_transaction(homeserver: Homeserver, txn_id: str, raw: bytes,
                           content_type: str = "application/json") -> tuple[int, Any]:
    url = f"http://127.0.0.1:{homeserver.bridge_port}/_matrix/app/v1/transactions/{txn_id}"
    headers = {"Authorization": f"Bearer {HS_TOKEN}", "Content-Type": content_type}
    async with aiohttp.ClientSession() as s, s.put(url, data=raw, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def _member(event_id: str, room: str, user: str, membership: str, **extra: Any
            ) -> dict[str, Any]:
    return {"type": "m.room.member", "event_id": event_id, "room_id": room, "state_key": user,
            "sender": user, "content": {"membership": membership}, "origin_server_ts": 1,
            **extra}


async def test_poison_events_are_skipped_and_the_ones_behind_them_recorded(
    bridge: Bridge, homeserver: Homeserver, caplog: pytest.LogCaptureFixture
) -> None:
    room, user = f"!{uuid.uuid4().hex}:localhost", "@someone:localhost"
    poison = [
        _member("$nul\x00id", room, user, "leave"),
        _member("$\ud800lone", room, user, "leave"),
        _member("$" + "x" * 2800, room, user, "leave"),
        {**_member("$deep", room, user, "leave"), "content": {"membership": "leave", "x": "DEEP"}},
        _member("$unsigned", f"{room}x", user, "join", unsigned=[]),
        _member("$nulname", f"{room}y", user, "join",
                content={"membership": "join", "displayname": "A\x00B\ud800"}),
    ]
    good = _member("$after-the-poison", room, user, "join")
    raw = json.dumps({"events": [*poison, good]}).encode().replace(
        b'"DEEP"', b"[" * 990 + b"]" * 990)  # too deep for json.dumps to write
    assert await _put_transaction(homeserver, "501", raw) == (200, {})
    assert await bridge.stores.members.get(room, user) == "join"  # type: ignore[arg-type]
    # Events the bridge can store as they are, or once repaired, are recorded too.
    assert await bridge.stores.members.get(f"{room}x", user) == "join"  # type: ignore[arg-type]
    assert await bridge.stores.members.get(f"{room}y", user) == "join"  # type: ignore[arg-type]
    skipped = [r.getMessage() for r in caplog.records if "cannot store" in r.getMessage()]
    assert len(skipped) == 4, skipped  # once each, saying which transaction and why
    assert all(m.startswith("txn 501: ") for m in skipped)
    assert ["NUL or a lone" in m for m in skipped] == [True, True, False, False]
    assert "longer than 255 bytes" in skipped[2] and "nested too deep" in skipped[3]

    # A charset that does not exist: JSON is UTF-8 whatever the header says.
    later = _member("$after-the-charset", room, user, "leave")
    assert await _put_transaction(homeserver, "502", json.dumps({"events": [later]}).encode(),
                                  "application/json; charset=no-such-charset") == (200, {})
    assert await bridge.stores.members.get(room, user) == "leave"  # type: ignore[arg-type]

    # A whole transaction nested too deep everywhere is still not JSON the bridge takes apart.
    status, err = await _put_transaction(homeserver, "503", b"[" * 5000 + b"]" * 5000)
    assert (status, err["errcode"]) == (400, "M_BAD_JSON")


async def test_platform_input_that_used_to_fail_gets_a_precise_error(
    bridge: Bridge, platform: Platform
) -> None:
    deep = b'{"sender": "+15550000001", "recipient": "@x:localhost", "text": ' + \
        b"[" * 990 + b"]" * 990 + b"}"
    for method, path in [("PUT", "/networks/sms/messages/deep"), ("POST", "/networks/sms/dms"),
                         ("POST", "/networks/sms/events/ack")]:
        status, err = await platform.call(method, path, SMS_TOKEN, data=deep)
        assert (status, err["errcode"]) == (400, "M_BAD_JSON"), (path, err)
        assert "nests deeper than 32 levels" in err["error"]

    for params in ({"user_id": "@a\x00:localhost"}, {"remote_id": "a\x00b"}):
        status, err = await platform.call("GET", "/networks/chat/dms", CHAT_TOKEN, params=params)
        assert (status, err["errcode"]) == (400, "M_BAD_JSON"), err
        assert "NUL" in err["error"]
    status, err = await platform.call("DELETE", "/networks/chat/messages/m1", CHAT_TOKEN,
                                      params={"sender": "bob", "reason": "a\x00"})
    assert (status, err["errcode"]) == (400, "M_BAD_JSON"), err
    # The longest URL the API takes (each character percent-encoded as 12 bytes) is answered by
    # the API, not refused by the HTTP parser in plain text.
    status, err = await platform.call("DELETE", "/networks/chat/messages/" + "\U0001f600" * 255,
                                      CHAT_TOKEN, params={"sender": "\U0001f600" * 255,
                                                          "reason": "\U0001f600" * 1000})
    assert (status, err["errcode"]) == (400, "DMBRIDGE_INVALID_REMOTE_ID"), err

    # A name the display-name template ("{name} (SMS)") makes longer than the homeserver takes.
    body = {"sender": "+15550000001", "recipient": "@x:localhost", "sender_name": "n" * 251}
    status, err = await platform.call("POST", "/networks/sms/dms", SMS_TOKEN, json=body)
    assert (status, err["errcode"]) == (400, "M_INVALID_PARAM"), err
    assert "longer than 256 characters" in err["error"]
    status, err = await platform.send("sms", SMS_TOKEN, "long-name", **body, text="hi")
    assert (status, err["errcode"]) == (400, "M_INVALID_PARAM"), err
    status, err = await platform.call("PUT", "/networks/sms/ghosts/+15550000001/profile",
                                      SMS_TOKEN, json={"name": "n" * 251})
    assert (status, err["errcode"]) == (400, "M_INVALID_PARAM"), err
    assert await bridge.stores.ghosts.get("@dm_sms_=2b15550000001:localhost") is None  # type: ignore[arg-type]

    for path, body_ in [("/dead-letters/retry", {"all": True, "ids": [1]}),
                        ("/dead-letters/retry", {"all": False}),
                        ("/dead-letters/retry", {"all": "yes", "ids": [1]}),
                        ("/events/ack", {"all": True, "ids": [0]}),
                        ("/events/ack", {"ids": [True]})]:
        status, err = await platform.call("POST", "/networks/sms" + path, SMS_TOKEN, json=body_)
        assert (status, err["errcode"]) == (400, "M_BAD_JSON"), (path, body_, err)
    assert await platform.call("POST", "/networks/sms/dead-letters/retry", SMS_TOKEN,
                               json={"all": True}) == (200, {"requeued": []})

    async with platform.session.delete(platform.base + "/networks/sms/dms",
                                       headers={"Authorization": f"Bearer {SMS_TOKEN}"}) as resp:
        assert resp.status == 405
        assert set(resp.headers["Allow"].replace(" ", "").split(",")) == {"GET", "POST"}


async def test_a_nul_in_the_users_display_name_does_not_turn_leaving_into_declining(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    """Synapse takes U+0000 in a display name; the bridge must still record the member events,
    or the user's later leave looks like the rejection of an invite it never saw accepted."""
    human = await new_human()
    feed = Feed(platform)
    status, opened = await platform.call("POST", "/networks/chat/dms", CHAT_TOKEN,
                                         json={"sender": "nulfan", "recipient": human.user_id})
    assert status == 200, opened
    room_id = opened["room_id"]
    resp = await human.client.set_displayname("Null\x00Fan")
    assert not hasattr(resp, "status_code") or resp.status_code is None, resp
    await accept_dm(human, room_id, bridge)
    await human.leave(room_id)
    await bridge_sees(bridge, room_id, human.user_id, "leave")
    left = await feed.expect("dm.user_left", room_id=room_id)
    assert left["dm"]["state"] == "active"
    assert not [e for e in feed.seen if e["type"] == "dm.declined"]


async def test_a_user_with_nul_in_their_display_name_can_start_a_dm_from_matrix(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    human = await new_human()
    await human.client.set_displayname("Null\x00Starter")
    feed = Feed(platform)
    ghost_id = f"@dm_chat_nulstart{uuid.uuid4().hex[:6]}:localhost"
    room_id = await human.create_dm(ghost_id)
    await human.wait_membership(room_id, ghost_id, "join")
    started = await feed.expect("dm.started", room_id=room_id)
    assert started["user_id"] == human.user_id
