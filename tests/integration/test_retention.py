"""What retention trades off, as a platform and a Matrix user see it on a real Synapse."""

from __future__ import annotations

import uuid

from dmbridge.bridge import Bridge
from dmbridge.db import now_ms
from dmbridge.retention import DAY_MS
from tests.integration.conftest import Platform, accept_dm
from tests.support.feed import Feed
from tests.support.settings import CHAT_TOKEN

NET = "chat"


async def test_a_reply_to_a_pruned_message_is_answered_as_for_an_unknown_one(
        bridge: Bridge, platform: Platform, new_human) -> None:
    human, feed, contact = await new_human(), Feed(platform), f"c{uuid.uuid4().hex[:12]}"

    async def send(message_id: str, **body: object) -> tuple[int, dict[str, object]]:
        return await platform.send(NET, CHAT_TOKEN, message_id, sender=contact,
                                   recipient=human.user_id, **body)

    status, first = await send("m1", text="hello")
    assert status == 200, first
    room_id = str(first["room_id"])
    await accept_dm(human, room_id, bridge)
    status, unknown = await send("m2", text="?", reply_to={"message_id": "never-sent"})
    assert status == 404, unknown

    counts = await bridge.retention.prune(now_ms() + 91 * DAY_MS)  # m1 is 91 days old now
    assert counts is not None and counts["sent_messages"] == 1

    status, pruned = await send("m3", text="?", reply_to={"message_id": "m1"})
    assert (status, pruned["errcode"]) == (404, unknown["errcode"]), pruned
    assert str(pruned["error"]) == str(unknown["error"]).replace("never-sent", "m1")
    # The Matrix user's reply to the pruned message reaches the platform, pointing at nothing
    # it knows.
    resp = await human.client.room_send(room_id, "m.room.message", {
        "msgtype": "m.text", "body": "answer",
        "m.relates_to": {"m.in_reply_to": {"event_id": first["event_id"]}}})
    message = (await feed.expect("message", room_id=room_id))["message"]
    assert message["event_id"] == resp.event_id  # type: ignore[union-attr]
    assert message["reply_to"] == {"event_id": first["event_id"], "message_id": None,
                                   "kind": "unknown"}

    # Its ID is free again: sent as a new message (Synapse, which still remembers the send's
    # transaction ID here, answers with the same event; 90 days on it would post it again).
    status, again = await send("m1", text="hello")
    assert (status, again["duplicate"]) == (200, False), again
