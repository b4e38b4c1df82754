"""A homeserver admin hears from the bridge bot about what needs a human."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from dmbridge.localhs import free_port
from dmbridge.notices import NoticeRoom, NoticeSettings
from dmbridge.startup import current_user
from tests.integration.conftest import BridgeFactory, Homeserver, Platform, accept_dm
from tests.support.matrix import Human
from tests.support.settings import AS_TOKEN, SMS_TOKEN

BOT = "@dmbridge_bot:localhost"


async def _notices_room(admin: Human) -> str:
    """The DM the bot invites the admin to, joined as a client would."""
    await admin.sync_until(lambda: any(
        e.sender == BOT and e.state_key == admin.user_id
        for events in admin.invites.values() for e in events))
    [(room_id, events)] = [(r, e) for r, e in admin.invites.items()
                           if any(x.sender == BOT for x in e)]
    invite = [e for e in events if e.state_key == admin.user_id][-1]
    assert invite.content.get("is_direct") is True
    await admin.join(room_id)
    return room_id


async def _notices(admin: Human, room_id: str, count: int) -> list[dict[str, Any]]:
    found = await admin.wait_messages(room_id, count)
    assert all(m["sender"] == BOT and m["content"]["msgtype"] == "m.notice" for m in found)
    return found


async def test_a_dead_letter_is_told_to_the_admin(
    start_bridge: BridgeFactory, new_human, platform: Platform, homeserver: Homeserver
) -> None:
    admin, user = await new_human(), await new_human()
    closed = free_port()  # nothing listens there: every delivery is refused
    bridge = await start_bridge(
        networks={"sms": {"delivery": {"mode": "webhook", "url": f"http://127.0.0.1:{closed}/",
                                       "secret": "notices-secret-0123456789"}}},
        **{"delivery.max_attempts": 2, "delivery.initial_backoff": 0.05,
           "admin_notices.user": admin.user_id},
    )
    status, sent = await platform.send("sms", SMS_TOKEN, "m1", sender="+15550001111",
                                       recipient=user.user_id, text="hello")
    assert status == 200, sent
    await user.wait_invite(sent["room_id"])
    await accept_dm(user, sent["room_id"], bridge)
    await user.say(sent["room_id"], "a reply the platform never gets")

    room_id = await _notices_room(admin)
    [notice] = (await _notices(admin, room_id, 1))[:1]
    body = notice["content"]["body"]
    assert "for network 'sms' is a dead letter: gave up after 2 attempt(s)" in body, body
    assert "`dmbridge dead-letters --network sms`" in body
    dead = await bridge.stores.outbox.dead_letters("sms", 10)
    assert any(body.startswith(f"dmbridge: outbox {d.id} ({d.type} for {user.user_id}) ")
               for d in dead), (body, dead)

    # After a restart, notices go to the same DM (found through the bot's m.direct).
    again = NoticeRoom(homeserver.url, AS_TOKEN, BOT, NoticeSettings(user=admin.user_id))
    try:
        await again("test", "dmbridge: the same room")
    finally:
        await again.close()
    later = await _notices(admin, room_id, 2)
    assert later[-1]["content"]["body"] == "dmbridge: the same room"


async def test_a_start_up_problem_is_told_in_the_admins_room(
    start_bridge: BridgeFactory, new_human, homeserver: Homeserver
) -> None:
    admin = await new_human()
    room_id = await admin.create_room()
    await admin.invite(room_id, BOT, is_direct=False)
    # The registration tells the homeserver to call the usual port; this bridge listens elsewhere.
    bridge = await start_bridge(**{
        "appservice.port": free_port(),
        "admin_notices.room": room_id, "admin_notices.repeat_window": 0,
    })
    assert not bridge.readiness.ready
    [notice] = (await _notices(admin, room_id, 1))[-1:]
    assert notice["content"]["body"].startswith(
        f"dmbridge: not ready: the homeserver could not reach the bridge at "
        f"http://127.0.0.1:{homeserver.bridge_port} (appservice.address)")


async def test_a_bridge_that_cannot_start_tells_the_admin(
    new_human, homeserver: Homeserver, tmp_path: Path
) -> None:
    admin = await new_human()
    settings_folder = tmp_path / "bridge"
    homeserver.settings(f"sqlite:///{tmp_path}/db.sqlite", settings_folder)
    missing = tmp_path / "missing" / "dmbridge.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dmbridge", "run", "-c", str(settings_folder / "config.yaml"),
        env={**os.environ, "DMBRIDGE_DATABASE__URL": f"sqlite:///{missing}",
             "DMBRIDGE_ADMIN_NOTICES__USER": admin.user_id,
             "DMBRIDGE_ADMIN_NOTICES__REPEAT_WINDOW": "0"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, err.decode()
    room_id = await _notices_room(admin)
    [notice] = await _notices(admin, room_id, 1)
    body = notice["content"]["body"]
    assert body.startswith("dmbridge: could not start: database "), body
    assert body.endswith(f"{missing.parent} does not exist; create it, writable by "
                         f"{current_user()}, or change database.url"), body
