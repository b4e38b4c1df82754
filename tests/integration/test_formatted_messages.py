"""Formatted text both ways, as the human's client and the platform see it."""

from __future__ import annotations

import uuid

from dmbridge.bridge import Bridge
from tests.integration.conftest import Platform, accept_dm
from tests.support.feed import Feed
from tests.support.settings import CHAT_TOKEN


async def _send(platform: Platform, contact: str, user_id: str, **body: object) -> dict:
    status, sent = await platform.send("chat", CHAT_TOKEN, uuid.uuid4().hex, sender=contact,
                                       recipient=user_id, **body)
    assert status == 200, sent
    return sent


async def test_platform_formatting_reaches_the_client_clean(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    """Markdown, notices, emotes and hostile HTML, as the human's client receives them."""
    human = await new_human()
    contact = f"f{uuid.uuid4().hex[:10]}"
    room_id = (await _send(platform, contact, human.user_id, markdown="**Hello** _you_"))["room_id"]
    await human.wait_invite(room_id)
    await human.join(room_id)
    await _send(platform, contact, human.user_id, text="Server maintenance", msgtype="notice")
    await _send(platform, contact, human.user_id, html="<i>waves</i>", msgtype="emote")
    await _send(platform, contact, human.user_id,
                html='<p onclick="steal()">Click <a href="javascript:alert(1)">here</a></p>'
                     '<script>alert(document.cookie)</script><style>body{display:none}</style>'
                     '<img src="https://tracker.example/pixel.png">')

    messages = await human.wait_messages(room_id, 4)
    contents = [m["content"] for m in messages]
    assert contents[0] == {"msgtype": "m.text", "body": "**Hello** _you_",
                           "format": "org.matrix.custom.html",
                           "formatted_body": "<p><strong>Hello</strong> <em>you</em></p>"}
    assert contents[1] == {"msgtype": "m.notice", "body": "Server maintenance"}
    assert contents[2] == {"msgtype": "m.emote", "body": "waves",
                           "format": "org.matrix.custom.html", "formatted_body": "<i>waves</i>"}
    assert contents[3] == {"msgtype": "m.text", "body": "Click here",
                           "format": "org.matrix.custom.html",
                           "formatted_body": "<p>Click <a>here</a></p><img>"}


async def test_matrix_formatting_reaches_the_platform_clean(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    """What a Matrix user writes in HTML reaches the platform without scripts or styles."""
    human = await new_human()
    contact = f"f{uuid.uuid4().hex[:10]}"
    room_id = (await _send(platform, contact, human.user_id, text="hi"))["room_id"]
    await accept_dm(human, room_id, bridge)
    await human.say(room_id, "bold move",
                    html='<b style="color:red">bold</b> move<script>alert(1)</script>')
    feed = Feed(platform)
    event = await feed.expect("message", room_id=room_id)
    assert event["message"]["text"] == "bold move"
    assert event["message"]["html"] == "<b>bold</b> move"
    assert event["message"]["msgtype"] == "m.text"
