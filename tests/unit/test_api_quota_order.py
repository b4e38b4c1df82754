"""The network's message quota is charged before the request's body is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from aiohttp.test_utils import TestClient, TestServer

from dmbridge.api import api_app
from dmbridge.api.operations import Operations
from dmbridge.quotas import Quotas
from tests.support.settings import CHAT_TOKEN, make_settings


async def test_over_its_quota_a_network_is_refused_before_its_body_is_read(
    tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path, homeserver_url="http://127.0.0.1:1", domain="hs.test", port=29341,
        db_url=f"sqlite:///{tmp_path / 'db'}",
        networks={"chat": {"quotas": {"messages_per_second": 0.001, "message_burst": 1}}})
    none = cast(Any, None)
    app = api_app(Operations(none, none, none, settings, Quotas()))
    answers = []
    async with TestClient(TestServer(app)) as http:
        for i in range(3):
            resp = await http.put(f"/networks/chat/messages/m{i}", data=b"{not json",
                                  headers={"Authorization": f"Bearer {CHAT_TOKEN}",
                                           "Content-Type": "application/json"})
            answers.append((resp.status, (await resp.json())["errcode"]))
    assert answers == [(400, "M_NOT_JSON"), (429, "DMBRIDGE_QUOTA_EXCEEDED"),
                       (429, "DMBRIDGE_QUOTA_EXCEEDED")]
