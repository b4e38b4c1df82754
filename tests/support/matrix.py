"""The human side of the tests: a matrix-nio client, and waiting for what it should see."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from nio import (
    AsyncClient,
    InviteMemberEvent,
    MessageDirection,
    RoomBanResponse,
    RoomCreateResponse,
    RoomGetStateEventResponse,
    RoomKickResponse,
    RoomLeaveResponse,
    RoomMessagesResponse,
    RoomPreset,
    RoomSendResponse,
    SyncResponse,
)


class Human:
    """A Matrix user with a real client, as a person in front of Element would be."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.user_id: str = client.user_id
        self.invites: dict[str, list[InviteMemberEvent]] = {}

    async def sync_until(self, done: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.user_id}: gave up waiting after {timeout} s")
            resp = await self.client.sync(timeout=500)
            if isinstance(resp, SyncResponse):
                for room_id, info in resp.rooms.invite.items():
                    self.invites.setdefault(room_id, []).extend(
                        e for e in info.invite_state if isinstance(e, InviteMemberEvent)
                    )

    async def wait_invite(self, room_id: str) -> InviteMemberEvent:
        """The invite's own member event, as the client shows it."""
        await self.sync_until(lambda: any(
            e.state_key == self.user_id for e in self.invites.get(room_id, [])
        ))
        return [e for e in self.invites[room_id] if e.state_key == self.user_id][-1]

    async def join(self, room_id: str) -> None:
        resp = await self.client.join(room_id)
        assert getattr(resp, "room_id", None) == room_id, resp

    async def leave(self, room_id: str) -> None:
        await self.client.room_leave(room_id)

    async def messages(self, room_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """The room's m.room.message events, oldest first, as raw event dicts."""
        resp = await self.client.room_messages(
            room_id, start=None, direction=MessageDirection.back, limit=limit
        )
        assert isinstance(resp, RoomMessagesResponse), resp
        events = [e.source for e in resp.chunk if e.source.get("type") == "m.room.message"]
        return list(reversed(events))

    async def wait_messages(self, room_id: str, count: int, timeout: float = 30.0
                            ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = await self.messages(room_id)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.2)

    async def state(self, room_id: str) -> list[dict[str, Any]]:
        resp = await self.client.room_get_state(room_id)
        return list(resp.events)  # type: ignore[union-attr]

    async def say(self, room_id: str, text: str, html: str | None = None) -> str:
        """Send an m.text message (with an HTML body if given); its event ID."""
        content: dict[str, Any] = {"msgtype": "m.text", "body": text}
        if html is not None:
            content |= {"format": "org.matrix.custom.html", "formatted_body": html}
        resp = await self.client.room_send(room_id, "m.room.message", content)
        assert isinstance(resp, RoomSendResponse), resp
        return str(resp.event_id)

    async def reject(self, room_id: str) -> None:
        """Reject an invite (a leave, as clients do it)."""
        resp = await self.client.room_leave(room_id)
        assert isinstance(resp, RoomLeaveResponse), resp

    async def kick(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        resp = await self.client.room_kick(room_id, user_id, reason)
        assert isinstance(resp, RoomKickResponse), resp

    async def ban(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        resp = await self.client.room_ban(room_id, user_id, reason)
        assert isinstance(resp, RoomBanResponse), resp

    async def invite(self, room_id: str, user_id: str, is_direct: bool = True) -> None:
        """Invite with ``is_direct`` in the member content, as Element does for DMs.

        nio's room_invite cannot set is_direct, so this PUTs the member state event itself;
        Synapse treats that as an invite and keeps the extra content.
        """
        path = (f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}"
                f"/state/m.room.member/{quote(user_id, safe='')}")
        body = {"membership": "invite", "is_direct": is_direct}
        headers = {"Authorization": f"Bearer {self.client.access_token}",
                   "Content-Type": "application/json"}
        resp = await self.client.send("PUT", path, json.dumps(body), headers=headers)
        text = await resp.text()
        if resp.status != 200:
            raise AssertionError(f"{self.user_id} inviting {user_id} to {room_id}: "
                                 f"{resp.status} {text}")

    async def create_dm(self, invitee: str) -> str:
        """A private room marked direct, with ``invitee`` invited; its room ID."""
        resp = await self.client.room_create(
            is_direct=True, invite=[invitee], preset=RoomPreset.private_chat
        )
        assert isinstance(resp, RoomCreateResponse), resp
        return str(resp.room_id)

    async def create_room(self) -> str:
        """A private room with no one else in it; its room ID."""
        resp = await self.client.room_create(preset=RoomPreset.private_chat)
        assert isinstance(resp, RoomCreateResponse), resp
        return str(resp.room_id)

    async def member_content(self, room_id: str, user_id: str) -> dict[str, Any] | None:
        """The content of ``user_id``'s current m.room.member event; None if there is none."""
        resp = await self.client.room_get_state_event(room_id, "m.room.member", user_id)
        # nio turns only a 404 into an error here: on a 403 the errcode dict comes back as
        # the "content", so look at the HTTP status rather than the response type.
        status = resp.transport_response.status if resp.transport_response else None
        if status == 404:
            return None
        if status != 200:
            raise AssertionError(f"{self.user_id} reading {user_id}'s membership in {room_id}: "
                                 f"{status} {getattr(resp, 'content', resp)}")
        assert isinstance(resp, RoomGetStateEventResponse), resp
        return dict(resp.content)

    async def membership(self, room_id: str, user_id: str) -> str | None:
        content = await self.member_content(room_id, user_id)
        return None if content is None else content.get("membership")

    async def wait_membership(self, room_id: str, user_id: str, membership: str,
                              timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (current := await self.membership(room_id, user_id)) != membership:
            if time.monotonic() > deadline:
                raise AssertionError(f"{user_id} in {room_id}: membership still {current!r} "
                                     f"after {timeout} s, expected {membership!r}")
            await asyncio.sleep(0.2)

    async def leave_reason(self, room_id: str, user_id: str) -> str | None:
        """The ``reason`` in ``user_id``'s current member event (a kick's, ban's or leave's)."""
        content = await self.member_content(room_id, user_id)
        return None if content is None else content.get("reason")
