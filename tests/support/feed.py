"""The platform's side of the pull API, for tests: pull, acknowledge, wait for an event."""

from __future__ import annotations

import time
from typing import Any

from tests.integration.conftest import Platform
from tests.support.settings import CHAT_TOKEN


class Feed:
    """The platform's side of the pull API: pulls, acknowledges, and remembers what came."""

    def __init__(self, platform: Platform, network: str = "chat", token: str = CHAT_TOKEN
                 ) -> None:
        self.platform = platform
        self.path = f"/networks/{network}/events"
        self.token = token
        self.seen: list[dict[str, Any]] = []
        self._after = 0
        self._taken: set[int] = set()

    async def pull(self, wait: float = 5) -> None:
        status, body = await self.platform.call(
            "GET", self.path, self.token, params={"after": str(self._after), "wait": str(wait)}
        )
        assert status == 200, body
        fresh = [e for e in body["events"] if e["id"] not in {s["id"] for s in self.seen}]
        self.seen.extend(fresh)
        self._after = body["next_after"]
        if body["events"]:
            ids = [e["id"] for e in body["events"]]
            status, ack = await self.platform.call("POST", self.path + "/ack", self.token,
                                                   json={"ids": ids})
            assert status == 200, ack

    async def expect(self, type_: str, *, room_id: str | None = None, reason: str | None = None,
                     text: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """The next event of this type (and room, reason or text) not returned before."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.seen:
                if event["id"] not in self._taken and _matches(event, type_, room_id, reason,
                                                               text):
                    self._taken.add(event["id"])
                    return event
            if time.monotonic() > deadline:
                got = [(e["type"], e.get("dm", {}).get("reason"), e["room_id"]) for e in self.seen]
                raise AssertionError(f"no {type_} (room {room_id}, reason {reason}, text "
                                     f"{text!r}) after {timeout} s; the feed had {got}")
            await self.pull()

    def texts(self) -> list[str]:
        return [e["message"]["text"] for e in self.seen if e["type"] == "message"]


def _matches(event: dict[str, Any], type_: str, room_id: str | None, reason: str | None,
             text: str | None) -> bool:
    return (event["type"] == type_
            and (room_id is None or event["room_id"] == room_id)
            and (reason is None or event["dm"]["reason"] == reason)
            and (text is None or event["message"]["text"] == text))
