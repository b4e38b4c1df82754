"""A message the API answered 200 is in the message map, whatever happens to the process next.

A `dmbridge run` process gets a burst of messages at once through the HTTP API and is killed
with SIGKILL as soon as the last 200 is back (no clean stop, nothing flushed on the way out).
After a restart every one of those messages is known: sent again, each is answered as a
duplicate with the event it became, and a reply, an edit and a deletion can point at each.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import DOMAIN, Homeserver, NewHuman, Platform
from tests.support.matrix import Human
from tests.support.process import BridgeProcess
from tests.support.settings import CHAT_TOKEN, make_settings

pytestmark = pytest.mark.integration

NET = "chat"
BURST = 20


def _text(i: int) -> str:
    return f"burst message {i}"


async def _room_events(human: Human, room_id: str) -> list[dict[str, Any]]:
    """Every message and redaction of the room, oldest first (as the client pages them)."""
    events: list[dict[str, Any]] = []
    start = ""
    for _ in range(20):  # bounded: a few pages of 100
        resp = await human.client.room_messages(room_id, start=start, limit=100)
        chunk = [e.source for e in getattr(resp, "chunk", [])]
        events.extend(chunk)
        if not chunk or not getattr(resp, "end", None):
            break
        start = resp.end  # type: ignore[union-attr]
    return list(reversed(events))


async def test_every_message_answered_200_before_a_sigkill_is_known_after_the_restart(
    homeserver: Homeserver, db_url: str, tmp_path: Path, new_human: NewHuman,
) -> None:
    make_settings(tmp_path, homeserver_url=homeserver.url, domain=DOMAIN,
                  port=homeserver.bridge_port, db_url=db_url, **{"logging.level": "INFO"})
    human, contact = await new_human(), f"c{uuid.uuid4().hex[:12]}"
    process = BridgeProcess(tmp_path / "config.yaml", tmp_path / "bridge.log")
    async with process, aiohttp.ClientSession() as session:
        platform = Platform(session, homeserver.bridge_port)

        async def send(message_id: str, **body: Any) -> tuple[int, Any]:
            return await platform.send(NET, CHAT_TOKEN, message_id, sender=contact,
                                       recipient=human.user_id, **body)

        process.start()
        await process.wait_ready(homeserver.bridge_port)
        status, first = await send("hello", text="hello")
        assert status == 200, first
        room_id = first["room_id"]
        await human.wait_invite(room_id)
        await human.join(room_id)

        ids = [f"m{i}-{uuid.uuid4().hex[:8]}" for i in range(BURST)]
        answers = await asyncio.gather(*(send(m, text=_text(i)) for i, m in enumerate(ids)))
        assert await process.kill() == -9  # at once: the last 200 is all the platform knows
        assert [status for status, _ in answers] == [200] * BURST, answers
        event_ids = [body["event_id"] for _, body in answers]
        assert {body["room_id"] for _, body in answers} == {room_id}

        process.start()
        await process.wait_ready(homeserver.bridge_port)
        # (a) The platform retries every message: each is a duplicate of the same event.
        again = await asyncio.gather(*(send(m, text=_text(i)) for i, m in enumerate(ids)))
        assert [(status, body["duplicate"], body["event_id"]) for status, body in again] == [
            (200, True, event_id) for event_id in event_ids], process.log_tail()
        shown = Counter(e["content"].get("body") for e in await _room_events(human, room_id)
                        if e["type"] == "m.room.message")
        assert [shown[_text(i)] for i in range(BURST)] == [1] * BURST, shown

        # (b) A reply, an edit and a deletion find each message.
        for i, message_id in enumerate(ids):
            status, reply = await send(f"re-{message_id}", text=f"reply {i}",
                                       reply_to={"message_id": message_id})
            assert status == 200 and reply["duplicate"] is False, reply
            status, edit = await send(f"ed-{message_id}", text=f"edited {i}",
                                      edits=message_id)
            assert status == 200 and edit["duplicate"] is False, edit
            status, deleted = await platform.call(
                "DELETE", f"/networks/{NET}/messages/{message_id}", CHAT_TOKEN,
                params={"sender": contact})
            assert status == 200 and deleted["duplicate"] is False, deleted

        events = await _room_events(human, room_id)
        by_id = {e["event_id"]: e for e in events}
        for i, event_id in enumerate(event_ids):
            relations = [e["content"].get("m.relates_to", {}) for e in events
                         if e["type"] == "m.room.message" and e["content"].get("body", "")
                         .endswith((f"reply {i}", f"edited {i}"))]
            assert any(r.get("m.in_reply_to", {}).get("event_id") == event_id
                       for r in relations), relations
            assert any(r.get("rel_type") == "m.replace" and r.get("event_id") == event_id
                       for r in relations), relations
            # The human's client shows the original deleted: its content is gone.
            assert by_id[event_id]["content"] == {}, by_id[event_id]
            assert "redacted_because" in by_id[event_id].get("unsigned", {})
        assert await process.terminate() == 0, process.log_tail()
