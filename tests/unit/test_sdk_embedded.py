"""dmbridge.embedded: the SDK client of an in-process bridge talks to its loopback listener."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmbridge.embedded import client_for
from tests.support.settings import CHAT_TOKEN, make_settings


@pytest.mark.parametrize(("hostname", "base"), [
    ("127.0.0.1", "http://127.0.0.1:{port}"),
    ("0.0.0.0", "http://127.0.0.1:{port}"),
    ("::", "http://[::1]:{port}"),
    ("::1", "http://[::1]:{port}"),
    ("fd00::5", "http://[fd00::5]:{port}"),
])
async def test_the_client_reaches_the_listener_at_a_url_it_can_use(
    tmp_path: Path, hostname: str, base: str
) -> None:
    settings: Any = make_settings(tmp_path, homeserver_url="http://127.0.0.1:1",
                                  domain="hs.test", port=29340,
                                  db_url=f"sqlite:///{tmp_path / 'db'}")
    settings = SimpleNamespace(hostname=hostname, port=settings.port,
                               networks=settings.networks)
    client = client_for(SimpleNamespace(settings=settings), "chat")  # type: ignore[arg-type]
    try:
        assert client.http.base == base.format(port=29340) + "/_dmbridge/v1"
        assert client.http.headers == {"Authorization": f"Bearer {CHAT_TOKEN}"}
    finally:
        await client.close()
