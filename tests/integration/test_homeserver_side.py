"""What the homeserver sees of the bridge: token checks, transactions, user queries, m.direct."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp

from dmbridge.bridge import Bridge
from tests.integration.conftest import Homeserver, Platform, bridge_sees, wait_for
from tests.support.settings import AS_TOKEN, CHAT_TOKEN, HS_TOKEN, SMS_TOKEN


async def _as_request(homeserver: Homeserver, method: str, path: str, token: str | None,
                      body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"http://127.0.0.1:{homeserver.bridge_port}{path}"
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body,
                                                        headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_appservice_endpoints_check_the_token(bridge: Bridge, homeserver: Homeserver
                                                    ) -> None:
    for method, path in [("PUT", "/_matrix/app/v1/transactions/1"),
                         ("GET", "/_matrix/app/v1/users/@dm_chat_x:localhost"),
                         ("POST", "/_matrix/app/v1/ping")]:
        body = {"events": []} if method == "PUT" else {}
        status, err = await _as_request(homeserver, method, path, None, body)
        assert (status, err["errcode"]) == (401, "M_MISSING_TOKEN"), path
        status, err = await _as_request(homeserver, method, path, "wrong", body)
        assert (status, err["errcode"]) == (403, "M_FORBIDDEN"), path


async def test_transactions_are_deduplicated_by_event_id(bridge: Bridge, homeserver: Homeserver
                                                         ) -> None:
    room, user = f"!{uuid.uuid4().hex}:localhost", "@someone:localhost"

    def member(event_id: str, membership: str) -> dict[str, Any]:
        return {"type": "m.room.member", "event_id": event_id, "room_id": room,
                "state_key": user, "sender": user, "content": {"membership": membership},
                "origin_server_ts": 1}

    path = "/_matrix/app/v1/transactions/{}"
    assert await _as_request(homeserver, "PUT", path.format(1), HS_TOKEN,
                             {"events": [member("$e1", "join")]}) == (200, {})
    assert await _as_request(homeserver, "PUT", path.format(2), HS_TOKEN,
                             {"events": [member("$e2", "leave")]}) == (200, {})
    # The homeserver restarted and counts transactions from 1 again, resending an old event.
    assert await _as_request(homeserver, "PUT", path.format(1), HS_TOKEN,
                             {"events": [member("$e1", "join"), member("$e3", "invite")]}
                             ) == (200, {})
    assert await bridge.stores.members.get(room, user) == "invite"  # type: ignore[arg-type]
    assert await _as_request(homeserver, "PUT", path.format(9), HS_TOKEN,
                             {"events": [member("$e1", "join")]}) == (200, {})
    assert await bridge.stores.members.get(room, user) == "invite"  # type: ignore[arg-type]

    status, err = await _as_request(homeserver, "PUT", path.format(3), HS_TOKEN, {"no": 1})
    assert (status, err["errcode"]) == (400, "M_BAD_JSON")


async def test_transaction_is_not_acknowledged_when_it_cannot_be_recorded(
    bridge: Bridge, homeserver: Homeserver
) -> None:
    await bridge.db.execute("DROP TABLE processed_event")  # the database fails every insert
    event = {"type": "m.room.member", "event_id": "$lost", "room_id": "!r:localhost",
             "state_key": "@u:localhost", "sender": "@u:localhost",
             "content": {"membership": "join"}}
    status, err = await _as_request(homeserver, "PUT", "/_matrix/app/v1/transactions/77",
                                    HS_TOKEN, {"events": [event]})
    assert status == 500 and err["errcode"] == "M_UNKNOWN"
    assert await bridge.stores.members.get("!r:localhost", "@u:localhost") is None  # type: ignore[arg-type]


async def test_user_query_registers_valid_ghosts_only(bridge: Bridge, homeserver: Homeserver,
                                                      new_human) -> None:
    name = f"newcomer{uuid.uuid4().hex[:6]}"
    ghost = f"@dm_chat_{name}:localhost"
    assert await _as_request(homeserver, "GET", f"/_matrix/app/v1/users/{ghost}", HS_TOKEN) \
        == (200, {})
    record = await bridge.stores.ghosts.get(ghost)  # type: ignore[arg-type]
    assert record is not None and record.registered and record.remote_id == name
    status, err = await _as_request(homeserver, "GET",
                                    "/_matrix/app/v1/users/@dm_sms_notaphone:localhost", HS_TOKEN)
    assert (status, err["errcode"]) == (404, "M_NOT_FOUND")

    # Through the homeserver: a human invites a never-seen ghost; Synapse asks the bridge first.
    human = await new_human()
    other = f"@dm_chat_{name}x:localhost"
    resp = await human.client.room_create(invite=[other], is_direct=True)
    assert getattr(resp, "room_id", None), resp

    async def registered() -> bool:
        found = await bridge.stores.ghosts.get(other)  # type: ignore[arg-type]
        return found is not None and found.registered

    await wait_for(registered, what="the ghost to be registered through the user query")
    async with aiohttp.ClientSession() as s, s.get(
        f"{homeserver.url}/_matrix/client/v3/profile/{other}"
    ) as r:
        assert r.status == 200


async def test_ghost_m_direct_lists_every_dm_and_keeps_other_entries(
    bridge: Bridge, homeserver: Homeserver, platform: Platform, new_human
) -> None:
    alice, bob = await new_human(), await new_human()
    ghost = "@dm_chat_carol:localhost"
    status, _ = await _as_request(homeserver, "GET", f"/_matrix/app/v1/users/{ghost}", HS_TOKEN)
    assert status == 200
    url = f"{homeserver.url}/_matrix/client/v3/user/{ghost}/account_data/m.direct"
    headers = {"Authorization": f"Bearer {AS_TOKEN}"}
    async with aiohttp.ClientSession() as s:
        async with s.put(url, params={"user_id": ghost}, headers=headers,
                         json={"@elsewhere:example.org": ["!old:example.org"]}) as r:
            assert r.status == 200

        rooms = {}
        for human in (alice, bob):
            status, body = await platform.send("chat", CHAT_TOKEN, f"hi-{human.user_id}",
                                               sender="carol", recipient=human.user_id,
                                               text="hi")
            assert status == 200, body
            rooms[human.user_id] = body["room_id"]

        async with s.get(url, params={"user_id": ghost}, headers=headers) as r:
            direct = await r.json()
    assert direct == {
        "@elsewhere:example.org": ["!old:example.org"],
        alice.user_id: [rooms[alice.user_id]],
        bob.user_id: [rooms[bob.user_id]],
    }


async def test_open_dm_without_sending_and_list_dms(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    human = await new_human()
    body = {"sender": "dave", "sender_name": "Dave", "recipient": human.user_id}
    status, opened = await platform.call("POST", "/networks/chat/dms", CHAT_TOKEN, json=body)
    assert status == 200 and opened["created"] is True, opened
    status, again = await platform.call("POST", "/networks/chat/dms", CHAT_TOKEN, json=body)
    assert again["created"] is False and again["room_id"] == opened["room_id"]
    await human.wait_invite(opened["room_id"])
    await human.join(opened["room_id"])
    await bridge_sees(bridge, opened["room_id"], human.user_id, "join")

    for params in ({"user_id": human.user_id}, {"remote_id": "dave"}):
        status, listed = await platform.call("GET", "/networks/chat/dms", CHAT_TOKEN,
                                             params=params)
        assert status == 200
        assert listed["dms"] == [{
            "room_id": opened["room_id"], "network": "chat", "remote_id": "dave",
            "ghost_id": "@dm_chat_dave:localhost", "user_id": human.user_id,
            "user_membership": "join", "state": "active",
        }]
    status, listed = await platform.call("GET", "/networks/sms/dms", SMS_TOKEN,
                                         params={"user_id": human.user_id})
    assert listed == {"dms": []}

