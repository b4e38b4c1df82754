"""A DM: one remote user and one Matrix user, and everything the remote user can do in it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING

from .errors import DmbridgeError
from .models import Deleted, DMInfo, Sent, Upload

if TYPE_CHECKING:
    from .client import Client, TargetLike

log = logging.getLogger("dmbridge_client")

class DM:
    """The DM between ``remote_id`` (the remote user, who sends) and ``user_id`` (Matrix).

    ``room_id`` is the Matrix room, ``ghost_id`` the remote user's Matrix account, ``created``
    whether opening it made the room (the request that answered: a retry after a lost answer
    finds the room the first attempt made and says false), ``replaced_room_id`` the room a
    fresh DM ended.
    ``is_dm`` is always true: the bridge keeps the room a one-to-one DM, and what happens
    otherwise reaches you as a notice.
    """

    is_dm = True

    def __init__(self, client: Client, info: DMInfo) -> None:
        self.client = client
        self.info = info
        self.room_id: str = info.room_id
        self.network: str = info.network
        self.remote_id: str = info.remote_id
        self.ghost_id: str = info.ghost_id
        self.user_id: str = info.user_id
        self.user_membership: str | None = info.user_membership
        self.created: bool = info.created
        self.replaced_room_id: str | None = info.replaced_room_id

    def __repr__(self) -> str:
        return (f"DM({self.info.network}:{self.info.remote_id} <-> {self.info.user_id} "
                f"in {self.info.room_id})")

    async def send(self, text: str | None = None, *, html: str | None = None,
                   markdown: str | None = None, media: Upload | str | None = None,
                   reply_to: TargetLike | None = None, thread_root: TargetLike | None = None,
                   msgtype: str | None = None, message_id: str | None = None,
                   ts: datetime | int | None = None) -> Sent:
        """Post a message; see :meth:`Client.send_message`."""
        return await self.client.send_message(
            self.info.remote_id, self.info.user_id, text, html=html, markdown=markdown,
            media=media, reply_to=reply_to, thread_root=thread_root, msgtype=msgtype,
            message_id=message_id, ts=ts)

    async def edit(self, target: Sent | str, text: str | None = None, *,
                   html: str | None = None, markdown: str | None = None,
                   message_id: str | None = None) -> Sent:
        """Replace the text of one of the remote user's messages (a :class:`Sent` or its ID)."""
        return await self.client.edit(self.info.remote_id, self.info.user_id, target, text,
                                      html=html, markdown=markdown, message_id=message_id)

    async def react(self, target: TargetLike, key: str, *,
                    reaction_id: str | None = None) -> Sent:
        """React with ``key`` (an emoji) to a message of either side."""
        return await self.client.react(self.info.remote_id, self.info.user_id, target, key,
                                       reaction_id=reaction_id)

    async def delete(self, target: Sent | str, *, reason: str | None = None) -> Deleted:
        """Delete a message, edit or reaction the remote user sent."""
        return await self.client.delete(self.info.remote_id, target, reason=reason)

    async def set_typing(self, typing: bool, *, show_for: float = 30.0) -> None:
        await self.client.set_typing(self.info.remote_id, self.info.user_id, typing,
                                     show_for=show_for)

    @contextlib.asynccontextmanager
    async def typing(self, *, show_for: float = 30.0) -> AsyncIterator[None]:
        """Show the remote user typing for as long as the block runs.

        Only the block's own errors leave it: a refresh or the final "stopped typing" that
        fails is logged (the typing notice then ends by itself after ``show_for`` seconds).
        """
        await self.set_typing(True, show_for=show_for)
        refresh = asyncio.create_task(self._keep_typing(show_for))
        try:
            yield
        finally:
            refresh.cancel()
            await asyncio.gather(refresh, return_exceptions=True)
            try:
                await self.set_typing(False)
            except DmbridgeError as e:
                log.warning("could not stop %s typing in %s: %s", self.remote_id,
                            self.room_id, e)

    async def _keep_typing(self, show_for: float) -> None:
        while True:
            await asyncio.sleep(show_for * 0.8)
            try:
                await self.set_typing(True, show_for=show_for)
            except DmbridgeError as e:  # the notice lapses; the next refresh tries again
                log.warning("could not keep %s typing in %s: %s", self.remote_id,
                            self.room_id, e)

    async def mark_read(self, event_id: str) -> None:
        """Show the Matrix user that the remote user read up to their message ``event_id``."""
        await self.client.mark_read(self.info.remote_id, self.info.user_id, event_id)
