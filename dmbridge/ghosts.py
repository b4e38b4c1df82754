"""Ghosts: the Matrix accounts that stand for remote users. Registered once, named on change."""

from __future__ import annotations

import logging

from mautrix.appservice import AppService, IntentAPI
from mautrix.types import ContentURI, UserID

from .db import Stores
from .locks import KeyedLocks
from .networks import Network

log = logging.getLogger("dmbridge.ghosts")

# Synapse refuses longer display names (MAX_DISPLAYNAME_LEN), in characters. The API refuses a
# sender name that would make one; a name made from a long remote ID alone is shortened.
MAX_DISPLAYNAME = 256


class Ghosts:
    def __init__(self, appservice: AppService, stores: Stores) -> None:
        self.appservice = appservice
        self.stores = stores
        # One registration or name change per ghost at a time: first contacts with many users
        # at once would otherwise each make the same request (and spend the ghost's rate limit).
        self._locks: KeyedLocks[UserID] = KeyedLocks()

    def intent(self, user_id: UserID) -> IntentAPI:
        return self.appservice.intent.user(user_id)

    async def ensure_registered(self, network: Network, remote_id: str) -> UserID:
        """Register the ghost on the homeserver unless the database says it already is."""
        ghost_id = network.ghost_user_id(remote_id)
        ghost = await self.stores.ghosts.get(ghost_id)
        if ghost is None or not ghost.registered:
            async with self._locks.hold(ghost_id):
                ghost = await self.stores.ghosts.get(ghost_id)
                if ghost is None or not ghost.registered:
                    await self.intent(ghost_id).ensure_registered()
                    await self.stores.ghosts.mark_registered(ghost_id, network.id, remote_id)
                    log.info("registered ghost %s for %s user %s", ghost_id, network.id,
                             remote_id)
        # Tell mautrix too, so its intents skip their own registration request.
        await self.appservice.state_store.registered(ghost_id)
        return ghost_id

    async def sync_displayname(
        self, network: Network, remote_id: str, sender_name: str | None, current: str | None
    ) -> None:
        """Set the display name the platform implies; no request when it is unchanged.

        A request without a sender name keeps the name the ghost already has.
        """
        if sender_name is None and current is not None:
            return
        wanted = network.ghost_displayname(remote_id, sender_name)
        if len(wanted) > MAX_DISPLAYNAME:
            wanted = wanted[: MAX_DISPLAYNAME - 1] + "…"
        if wanted == current:
            return
        ghost_id = network.ghost_user_id(remote_id)
        async with self._locks.hold(ghost_id):
            ghost = await self.stores.ghosts.get(ghost_id)
            if ghost is not None and ghost.displayname == wanted:
                return  # a concurrent request set it meanwhile
            await self.intent(ghost_id).set_displayname(wanted, check_current=False)
            await self.stores.ghosts.set_displayname(ghost_id, wanted)
        log.info("display name of %s is now %r", ghost_id, wanted)

    async def set_avatar(self, network: Network, remote_id: str, content_uri: str) -> None:
        """Set (or, with "", remove) the ghost's avatar; the caller checks it changed."""
        ghost_id = network.ghost_user_id(remote_id)
        await self.intent(ghost_id).set_avatar_url(ContentURI(content_uri), check_current=False)
        await self.stores.ghosts.set_avatar(ghost_id, content_uri)
        log.info("avatar of %s is now %r", ghost_id, content_uri or None)
