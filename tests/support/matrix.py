"""The human side of the tests: a matrix-nio client, and waiting for what it should see."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from nio import AsyncClient, InviteMemberEvent, MessageDirection, RoomMessagesResponse, SyncResponse


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
