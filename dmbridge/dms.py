"""Open or reuse the one DM room between a ghost and a Matrix user, and send into it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import mimetypes
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from mautrix.api import Method, Path
from mautrix.appservice import AppService
from mautrix.errors import MatrixRequestError, MForbidden, MNotFound
from mautrix.types import EventID, EventType, RoomCreatePreset, RoomID, UserID

from .config import Settings
from .db import Stores, now_ms
from .db.dm import ACTIVE, CREATING, DECLINED, JOINING, DMRecord
from .db.media import Media
from .db.message import EDIT, MESSAGE, REACTION, SentMessage
from .errors import (
    Busy,
    Declined,
    HomeserverError,
    InvalidParam,
    NotFound,
    NotPermitted,
    TooLarge,
    UnknownRecipient,
    storable,
)
from .formatting import compose
from .ghosts import Ghosts
from .homeserver import Homeserver
from .lifecycle import clear_declined
from .locks import KeyedLocks
from .media import MediaService, content_info, msgtype_for
from .networks import Network
from .ratelimit import Pacing
from .relations import (
    DuplicateReaction,
    GhostNotInRoom,
    NotYours,
    Target,
    check_reaction_key,
    check_room,
    edit_content,
    reaction_content,
    reply_content,
    resolve,
    with_article,
)

log = logging.getLogger("dmbridge.dms")

_USER_ID = re.compile(r"@[\x21-\x39\x3b-\x7e]+:[A-Za-z0-9.\-\[\]:]+")
# Room versions where the creator holds power implicitly and must not be in power_levels.users.
_CREATOR_POWER_VERSIONS = frozenset({"12", "org.matrix.hydra.11"})
_DECLINE_WORDING = {
    "invite_rejected": "rejected the invite",
    "ghost_kicked": "removed this contact from the DM",
    "ghost_banned": "banned this contact from the DM",
}
MAX_CONTENT_BYTES = 60_000  # below the homeserver's 64 KiB event limit, leaving room for the rest


@dataclass(frozen=True)
class DM:
    room_id: RoomID
    network: str
    remote_id: str
    ghost_id: UserID
    user_id: UserID
    user_membership: str | None
    state: str = ACTIVE
    reason: str | None = None

    @classmethod
    def of(cls, record: DMRecord) -> DM:
        assert record.room_id is not None
        return cls(
            room_id=record.room_id, network=record.network, remote_id=record.remote_id,
            ghost_id=record.ghost_id, user_id=record.user_id,
            user_membership=record.user_membership, state=record.state, reason=record.reason,
        )


@dataclass(frozen=True)
class OpenedDM:
    dm: DM
    created: bool


@dataclass(frozen=True)
class SendResult:
    room_id: RoomID
    event_id: EventID
    room_created: bool
    duplicate: bool


def txn_id_for(network_id: str, remote_id: str, message_id: str, action: str = "") -> str:
    """Deterministic: the homeserver drops a resend of the same platform message (or of the
    same ``action`` on it, such as its deletion)."""
    prefix = f"{action}\0" if action else ""
    digest = hashlib.sha256(
        f"{prefix}{network_id}\0{remote_id}\0{message_id}".encode()).hexdigest()
    return f"dmbridge.{digest[:40]}"


class _NoNewRoom(Exception):
    """Only a new room would do, and the caller asked for none."""


@dataclass(frozen=True)
class Profile:
    """What the platform says about its user; None leaves that part as it is."""

    name: str | None = None
    avatar: str | None = None


def _check_message_id(message_id: object, what: str = "message_id") -> None:
    if not isinstance(message_id, str) or not 0 < len(message_id) <= 255:
        raise InvalidParam(f"{what} must be a string of 1 to 255 characters")
    storable(message_id, what)


def _check_size(content: dict[str, Any]) -> None:
    size = len(json.dumps(content, ensure_ascii=False).encode())  # as the homeserver counts
    if size > MAX_CONTENT_BYTES:
        raise TooLarge(f"the message is {size} bytes; at most {MAX_CONTENT_BYTES} fit an event")


def _duplicate(sent: SentMessage, kind: str, message_id: str) -> SendResult:
    """A retried request: the first answer again, unless the ID was used for something else."""
    if sent.kind != kind:
        raise InvalidParam(f"{message_id} was already used for {with_article(sent.kind)} by"
                           " this sender; message, edit and reaction IDs share one space")
    return SendResult(sent.room_id, sent.event_id, room_created=False, duplicate=True)


def _media_content(media: Media, text: str | None, html: str | None, markdown: str | None
                   ) -> dict[str, Any]:
    """An m.image / m.video / m.audio / m.file event; the text, if any, is its caption."""
    filename = media.filename or _default_filename(media.mimetype)
    content: dict[str, Any] = {
        "msgtype": msgtype_for(media.mimetype), "body": filename, "filename": filename,
        "url": media.content_uri, "info": content_info(media),
    }
    if text is not None or html is not None or markdown is not None:
        caption = compose(text=text, html=html, markdown=markdown).content()
        content.update({k: v for k, v in caption.items() if k != "msgtype"})
    return content


def _default_filename(mimetype: str) -> str:
    kind = mimetype.split("/", 1)[0]
    return (kind if kind in ("image", "video", "audio") else "file") + (
        mimetypes.guess_extension(mimetype) or "")


def _check_permitted(network: Network, user_id: UserID) -> None:
    if not network.send_to.allows(user_id):
        raise NotPermitted(f"network '{network.id}' may not write to {user_id}"
                           " (networks[].permissions.send_to)")


def _declined(record: DMRecord) -> Declined:
    how = _DECLINE_WORDING.get(record.reason or "", "declined DMs from this contact")
    return Declined(
        f"{record.user_id} {how}; nothing more is sent to them until they reach out again"
        f" (reason: {record.reason})"
    )


def _unusable_reason(record: DMRecord) -> str | None:
    """Why this DM room cannot take the next message as it is, or None if it can."""
    if record.ghost_membership != "join":
        return f"the ghost is not in the room ({record.ghost_membership or 'unknown'})"
    if record.others_joined:
        return f"{record.others_joined} other member(s) joined"
    if record.user_membership in ("join", "invite"):
        return None
    return "user-left"


@asynccontextmanager
async def homeserver_errors(what: str) -> AsyncIterator[None]:
    """Turn a homeserver failure into an error the platform can act on."""
    try:
        yield
    except MatrixRequestError as e:
        raise HomeserverError(f"the homeserver refused to {what}: {e}") from e
    except (TimeoutError, aiohttp.ClientError) as e:
        raise HomeserverError(f"the homeserver could not be reached to {what}: {e!r}") from e


class DMService:
    """The Python API of the bridge: open_dm, send, list_dms."""

    def __init__(
        self, *, settings: Settings, stores: Stores, appservice: AppService, ghosts: Ghosts,
        homeserver: Homeserver, media: MediaService, pacing: Pacing,
    ) -> None:
        self.settings = settings
        self.pacing = pacing
        self.media = media
        self.networks = settings.networks
        self.stores = stores
        self.appservice = appservice
        self.ghosts = ghosts
        self.homeserver = homeserver
        self._pair_locks: KeyedLocks[tuple[UserID, UserID]] = KeyedLocks()
        self._direct_locks: KeyedLocks[UserID] = KeyedLocks()
        self._room_version: str | None = None

    # --- the Python API ---------------------------------------------------------------------

    async def open_dm(
        self, network_id: str, remote_id: str, user_id: str, *, sender_name: str | None = None,
        sender_avatar: str | None = None,
    ) -> OpenedDM:
        network = self.networks.get(network_id)
        ghost_id = network.ghost_user_id(remote_id)
        recipient = self._check_recipient(user_id)
        _check_permitted(network, recipient)
        record = await self.stores.dms.get_current(ghost_id, recipient)
        if record is None or sender_avatar != record.ghost_avatar_url:
            await self._check_avatar(network, sender_avatar)  # before a room or a ghost exists
        profile = Profile(sender_name, sender_avatar)
        return await self._open(network, remote_id, ghost_id, recipient, profile, record)

    async def send(
        self, network_id: str, remote_id: str, user_id: str, *, message_id: str,
        text: str | None = None, html: str | None = None, markdown: str | None = None,
        msgtype: str = "text", sender_name: str | None = None, sender_avatar: str | None = None,
        media: str | None = None, reply_to: Target | None = None, edits: str | None = None,
    ) -> SendResult:
        """Send a message from a remote user; ``html`` is sanitised, ``markdown`` rendered.

        ``media`` is a content URI the network uploaded (the text becomes its caption);
        ``reply_to`` makes it a reply, ``edits`` (one of the sender's message IDs) an edit.
        """
        network = self.networks.get(network_id)
        ghost_id = network.ghost_user_id(remote_id)
        recipient = self._check_recipient(user_id)
        _check_message_id(message_id)
        if edits is not None and (reply_to is not None or media is not None):
            raise InvalidParam("an edit replaces a message's text; it takes no reply_to or media")
        if media is not None:
            if msgtype != "text":
                raise InvalidParam("a media message's msgtype follows the media's type")
            uploaded = await self.media.uploaded(network, media, "media")
            content = _media_content(uploaded, text, html, markdown)
        else:
            content = compose(text=text, html=html, markdown=markdown, msgtype=msgtype).content()
        kind = EDIT if edits is not None else MESSAGE
        target = Target(message_id=edits) if edits is not None else reply_to
        _check_size(content if edits is None else edit_content(content, EventID("$" + "x" * 60)))

        record, sent = await self.stores.dms.get_for_send(
            ghost_id, recipient, network.id, remote_id, message_id
        )
        if sent is not None:
            return _duplicate(sent, kind, message_id)
        _check_permitted(network, recipient)
        purpose = "edit" if edits is not None else "reply to"
        resolved = None
        if target is not None:
            resolved = await resolve(self.stores, network.id, remote_id, recipient, target,
                                     purpose=purpose)
            # Refused before any room is opened: a target elsewhere changes nothing.
            check_room(resolved, record.room_id if record else None, target, purpose)
        if record is None or sender_avatar != record.ghost_avatar_url:
            await self._check_avatar(network, sender_avatar)  # before a room or a ghost exists
        profile = Profile(sender_name, sender_avatar)
        try:  # a reply, edit or reaction belongs in the room of its target: never a new one
            opened = await self._open(network, remote_id, ghost_id, recipient, profile, record,
                                      new_room=resolved is None)
        except _NoNewRoom:
            assert resolved is not None and target is not None
            check_room(resolved, None, target, purpose)
            raise
        if resolved is not None and target is not None:
            check_room(resolved, opened.dm.room_id, target, purpose)
            content = (edit_content(content, resolved.event_id) if edits is not None
                       else reply_content(content, resolved.event_id))
        txn_id = txn_id_for(network.id, remote_id, message_id)
        try:
            event_id = await self._send_into(opened.dm, txn_id, content)
        except MForbidden as e:
            if resolved is not None:  # a new room would not hold the target either
                raise HomeserverError(f"the homeserver refused the message: {e}") from e
            # Our view of the room was behind the homeserver's: retire the room, open afresh.
            log.warning("send into %s refused (%s); opening a new DM", opened.dm.room_id, e)
            await self.stores.dms.end(opened.dm.room_id, now_ms())
            opened = await self.open_dm(network.id, remote_id, user_id, sender_name=sender_name,
                                        sender_avatar=sender_avatar)
            try:
                event_id = await self._send_into(opened.dm, txn_id, content)
            except MForbidden as again:
                raise HomeserverError(f"the homeserver refused the message: {again}") from again
        sent = await self.stores.messages.put(
            network.id, remote_id, message_id,
            SentMessage(opened.dm.room_id, event_id, kind,
                        resolved.event_id if resolved is not None else None),
            now_ms(),
        )
        return SendResult(sent.room_id, sent.event_id, room_created=opened.created, duplicate=False)

    async def react(self, network_id: str, remote_id: str, user_id: str, *, reaction_id: str,
                    target: Target, key: str) -> SendResult:
        """The remote user reacts to a message of their DM with ``key`` (an emoji, usually)."""
        network = self.networks.get(network_id)
        ghost_id = network.ghost_user_id(remote_id)
        recipient = self._check_recipient(user_id)
        _check_message_id(reaction_id, "reaction_id")
        key = check_reaction_key(key)
        record, sent = await self.stores.dms.get_for_send(
            ghost_id, recipient, network.id, remote_id, reaction_id
        )
        if sent is not None:
            return _duplicate(sent, REACTION, reaction_id)
        _check_permitted(network, recipient)
        if record is not None and record.state == DECLINED:
            raise _declined(record)
        if record is None or record.state != ACTIVE or record.room_id is None:
            raise NotFound(f"there is no open DM between {network.id} user {remote_id} and "
                           f"{user_id}")
        resolved = await resolve(self.stores, network.id, remote_id, recipient, target,
                                 purpose="react to")
        check_room(resolved, record.room_id, target, "react to")
        dm = DM.of(record)
        async with homeserver_errors("take the reaction"):
            try:
                event_id = await self.homeserver.send_event(
                    dm.ghost_id, dm.room_id, "m.reaction",
                    txn_id_for(network.id, remote_id, reaction_id),
                    reaction_content(key, resolved.event_id),
                )
            except MatrixRequestError as e:
                if e.errcode != "M_DUPLICATE_ANNOTATION":
                    raise
                raise DuplicateReaction(f"{remote_id} already reacted to {target} with {key!r}"
                                        ) from e
        sent = await self.stores.messages.put(
            network.id, remote_id, reaction_id,
            SentMessage(dm.room_id, event_id, REACTION, resolved.event_id), now_ms(),
        )
        return SendResult(sent.room_id, sent.event_id, room_created=False, duplicate=False)

    async def redact(self, network_id: str, remote_id: str, *, message_id: str,
                     reason: str | None = None) -> SendResult:
        """Delete something the remote user sent: a message, an edit, or a reaction."""
        network = self.networks.get(network_id)
        ghost_id = network.ghost_user_id(remote_id)
        _check_message_id(message_id)
        sent = await self.stores.messages.get(network.id, remote_id, message_id)
        if sent is None:
            if await self.stores.messages.sender_of(network.id, message_id):
                raise NotYours(f"message {message_id} was sent by another {network.id} user;"
                               " only its sender can delete it")
            raise NotFound(f"{remote_id} sent no message {message_id} through the bridge")
        async with homeserver_errors("delete the message"):
            try:
                event_id = await self.homeserver.redact(
                    ghost_id, sent.room_id, sent.event_id,
                    txn_id_for(network.id, remote_id, message_id, "redact"), reason,
                )
            except MForbidden as e:
                raise GhostNotInRoom(f"{message_id} is in {sent.room_id}, which {ghost_id} has"
                                     f" left; it can no longer be deleted") from e
        await self.stores.messages.mark_redacted(network.id, remote_id, message_id, now_ms())
        log.info("%s user %s deleted %s (%s in %s)", network.id, remote_id, message_id,
                 sent.event_id, sent.room_id)
        return SendResult(sent.room_id, event_id, room_created=False,
                          duplicate=sent.redacted_at is not None)

    async def set_profile(self, network_id: str, remote_id: str, *, name: str | None = None,
                          avatar: str | None = None) -> tuple[UserID, str | None, str | None]:
        """Update a ghost's name and avatar without a message; no request for what is unchanged.

        Returns the ghost's ID, display name and avatar as they now are.
        """
        network = self.networks.get(network_id)
        network.ghost_user_id(remote_id)  # a bad remote ID is refused before anything else
        await self._check_avatar(network, avatar, "avatar")
        async with homeserver_errors("register the ghost"):
            ghost_id = await self.ghosts.ensure_registered(network, remote_id)
        ghost = await self.stores.ghosts.get(ghost_id)
        await self._sync_profile(network, remote_id, Profile(name, avatar),
                                 ghost.displayname if ghost else None,
                                 ghost.avatar_url if ghost else None)
        ghost = await self.stores.ghosts.get(ghost_id)
        assert ghost is not None
        return ghost_id, ghost.displayname, ghost.avatar_url or None

    async def set_typing(self, network_id: str, remote_id: str, user_id: str, *, typing: bool,
                         timeout_ms: int = 30_000) -> RoomID:
        """Show (or stop showing) the remote user typing in their current DM."""
        dm = await self._current(network_id, remote_id, user_id)
        content: dict[str, Any] = {"typing": typing}
        if typing:
            content["timeout"] = timeout_ms
        async with homeserver_errors("show the typing notice"):
            await self.ghosts.intent(dm.ghost_id).api.request(
                Method.PUT, Path.v3.rooms[dm.room_id].typing[dm.ghost_id], content=content,
            )
        return dm.room_id

    async def mark_read(self, network_id: str, remote_id: str, user_id: str, *, event_id: str
                        ) -> RoomID:
        """The remote user has read the DM up to ``event_id``, a message they were delivered."""
        dm = await self._current(network_id, remote_id, user_id)
        received = await self.stores.matrix_messages.get(event_id)
        delivered = received is not None and received.of_dm(dm.network, dm.remote_id,
                                                            dm.user_id)
        if not delivered and not await self.stores.outbox.was_delivered_message(
            dm.network, dm.remote_id, dm.user_id, event_id
        ):  # the outbox answers for messages delivered before the message map existed
            raise NotFound(f"{event_id} is not a message this DM delivered to {dm.network}")
        async with homeserver_errors("send the read receipt"):
            await self.ghosts.intent(dm.ghost_id).api.request(
                Method.POST, Path.v3.rooms[dm.room_id].receipt["m.read"][EventID(event_id)],
                content={},
            )
        return dm.room_id

    async def _current(self, network_id: str, remote_id: str, user_id: str) -> DM:
        network = self.networks.get(network_id)
        ghost_id = network.ghost_user_id(remote_id)
        record = await self.stores.dms.get_current(ghost_id, self._check_recipient(user_id))
        if record is None or record.state != ACTIVE or record.room_id is None:
            raise NotFound(f"there is no open DM between {network.id} user {remote_id} and "
                           f"{user_id}")
        return DM.of(record)

    async def list_dms(
        self, *, network_id: str | None = None, user_id: str | None = None,
        remote_id: str | None = None, limit: int = 100,
    ) -> list[DM]:
        ghost_id = None
        if remote_id is not None:
            if network_id is None:
                raise InvalidParam("remote_id needs a network")
            ghost_id = self.networks.get(network_id).ghost_user_id(remote_id)
        elif network_id is not None:
            self.networks.get(network_id)
        records = await self.stores.dms.find(
            network=network_id, user_id=UserID(user_id) if user_id else None, ghost_id=ghost_id,
            limit=limit,
        )
        return [DM.of(r) for r in records]

    async def clear_declined(self, network_id: str, remote_id: str, user_id: str) -> None:
        """An admin lifts a decline: the platform may write to the user again."""
        await clear_declined(self.stores, self.networks.get(network_id), remote_id, user_id)

    # --- open or reuse ----------------------------------------------------------------------

    async def _open(
        self, network: Network, remote_id: str, ghost_id: UserID, user_id: UserID,
        profile: Profile, record: DMRecord | None, *, new_room: bool = True,
    ) -> OpenedDM:
        """Reuse the DM looked up as ``record`` if it is usable; otherwise fix or make one."""
        if record and record.state == ACTIVE and _unusable_reason(record) is None:
            await self._sync_profile(network, remote_id, profile, record.ghost_displayname,
                                     record.ghost_avatar_url)
            return OpenedDM(DM.of(record), created=False)
        async with self._pair_locks.hold((ghost_id, user_id)):
            return await self._open_locked(network, remote_id, ghost_id, user_id, profile,
                                           new_room)

    async def _open_locked(
        self, network: Network, remote_id: str, ghost_id: UserID, user_id: UserID,
        profile: Profile, new_room: bool = True,
    ) -> OpenedDM:
        """``new_room=False``: reuse (or re-invite into) the current room, never make another."""
        deadline = time.monotonic() + self.settings.creation_timeout
        while True:
            record = await self.stores.dms.get_current(ghost_id, user_id)
            if record is None:
                if not new_room:
                    raise _NoNewRoom
                await self._check_recipient_exists(user_id)
                claim = secrets.token_hex(8)
                if await self.stores.dms.claim(
                    ghost_id, user_id, network.id, remote_id, claim, now_ms()
                ):
                    return await self._create(network, remote_id, ghost_id, user_id, profile,
                                              claim)
                continue  # another worker claimed the pair first; wait for its room
            if record.state == DECLINED:
                raise _declined(record)
            if record.state == JOINING:
                # The user invited the ghost and it is joining: that room is about to be the DM.
                if time.monotonic() >= deadline:
                    raise Busy(f"{ghost_id} is still joining the DM {user_id} invited it to")
                await asyncio.sleep(0.05)
                continue
            if record.state == CREATING:
                if time.monotonic() >= deadline:
                    stale = now_ms() - record.updated_at > self.settings.creation_timeout * 1000
                    claim = secrets.token_hex(8)
                    if stale and not new_room:
                        raise _NoNewRoom
                    if stale and await self.stores.dms.take_over(
                        ghost_id, user_id, record.claim, claim, now_ms()
                    ):
                        log.warning("taking over an unfinished DM creation for %s / %s",
                                    ghost_id, user_id)
                        return await self._create(network, remote_id, ghost_id, user_id,
                                                  profile, claim)
                    raise Busy(f"the DM between {ghost_id} and {user_id} is still being created")
                await asyncio.sleep(0.05)
                continue
            reason = _unusable_reason(record)
            if reason is None:
                await self._sync_profile(network, remote_id, profile, record.ghost_displayname,
                                         record.ghost_avatar_url)
                return OpenedDM(DM.of(record), created=False)
            assert record.room_id is not None
            if (reason == "user-left" and self.settings.on_leave == "reinvite"
                    and await self._reinvite(record)):
                return OpenedDM(DM.of(record), created=False)
            if not new_room:
                raise _NoNewRoom
            log.info("DM room %s (%s / %s) is no longer usable: %s; opening a new one",
                     record.room_id, ghost_id, user_id, reason)
            await self.stores.dms.end(record.room_id, now_ms())

    async def _create(
        self, network: Network, remote_id: str, ghost_id: UserID, user_id: UserID,
        profile: Profile, claim: str,
    ) -> OpenedDM:
        try:
            async with homeserver_errors("create the DM room"):
                await self.ghosts.ensure_registered(network, remote_id)
                ghost = await self.stores.ghosts.get(ghost_id)
                await self._sync_profile(network, remote_id, profile,
                                         ghost.displayname if ghost else None,
                                         ghost.avatar_url if ghost else None)
                room_id = await self._create_room(network, remote_id, ghost_id, user_id)
        except BaseException:
            await self.stores.dms.release(ghost_id, user_id, claim)
            raise
        await self.stores.members.assume(room_id, ghost_id, "join")
        await self.stores.members.assume(room_id, user_id, "invite")
        await self.appservice.state_store.joined(room_id, ghost_id)
        await self.appservice.state_store.invited(room_id, user_id)
        if not await self.stores.dms.activate(ghost_id, user_id, claim, room_id, now_ms()):
            log.error("DM room %s was created after its claim was taken over; it is unused",
                      room_id)
            raise Busy(f"the DM between {ghost_id} and {user_id} was being created twice")
        log.info("opened DM room %s between %s and %s", room_id, ghost_id, user_id)
        try:
            await self.add_to_m_direct(ghost_id, user_id, room_id)
        except (TimeoutError, MatrixRequestError, aiohttp.ClientError) as e:
            # The room works; m.direct is repaired by the ghost's next DM (it merges every room).
            log.error("could not list %s in the m.direct of %s: %r", room_id, ghost_id, e)
        record = await self.stores.dms.get_current(ghost_id, user_id)
        assert record is not None
        return OpenedDM(DM.of(record), created=True)

    async def _create_room(
        self, network: Network, remote_id: str, ghost_id: UserID, user_id: UserID
    ) -> RoomID:
        users = {user_id: 100}
        if await self._default_room_version() not in _CREATOR_POWER_VERSIONS:
            users[ghost_id] = 100
        bridge_info = {
            "bridgebot": self.settings.bot_user_id,
            "creator": ghost_id,
            "protocol": {"id": network.id, "displayname": network.name},
            "channel": {"id": remote_id},
        }
        state_key = f"dmbridge://{network.id}/{remote_id}"
        async with self.pacing.new_room(network):  # the bridge's pace and the network's quota
            return await self.ghosts.intent(ghost_id).create_room(
                preset=RoomCreatePreset.PRIVATE,
                is_direct=True,
                invitees=[user_id],
                initial_state=[
                    {"type": kind, "state_key": state_key, "content": bridge_info}
                    for kind in ("m.bridge", "uk.half-shot.bridge")
                ],
                power_level_override={"users": users},
            )

    async def _default_room_version(self) -> str:
        if self._room_version is None:
            caps = await self.appservice.intent.api.request(Method.GET, Path.v3.capabilities)
            version = caps.get("capabilities", {}).get("m.room_versions", {}).get("default", "")
            self._room_version = str(version)
        return self._room_version

    async def _reinvite(self, record: DMRecord) -> bool:
        """Invite a user who left back into the same room; False if the room refuses."""
        assert record.room_id is not None
        try:
            await self.ghosts.intent(record.ghost_id).invite_user(
                record.room_id, record.user_id, extra_content={"is_direct": True},
                ensure_joined=False,  # type: ignore[call-arg]  # taken by mautrix's wrapper
            )
        except MForbidden as e:
            log.info("could not re-invite %s to %s: %s", record.user_id, record.room_id, e)
            return False
        except (TimeoutError, MatrixRequestError, aiohttp.ClientError) as e:
            raise HomeserverError(f"the homeserver refused to re-invite the user: {e}") from e
        if record.user_membership is None:
            await self.stores.members.assume(record.room_id, record.user_id, "invite")
        else:
            await self.stores.members.replace(
                record.room_id, record.user_id, record.user_membership, "invite"
            )
        log.info("re-invited %s to DM room %s", record.user_id, record.room_id)
        return True

    async def add_to_m_direct(self, ghost_id: UserID, user_id: UserID, room_id: RoomID) -> None:
        """Read, merge, write the ghost's m.direct: other entries are never lost."""
        async with self._direct_locks.hold(ghost_id):
            intent = self.ghosts.intent(ghost_id)
            try:
                current = dict(await intent.get_account_data(EventType.DIRECT))
            except MNotFound:
                current = {}
            merged: dict[str, Any] = {k: list(v) if isinstance(v, list) else v
                                      for k, v in current.items()}
            known = await self.stores.dms.active_rooms_of_ghost(ghost_id)
            known.setdefault(user_id, []).append(room_id)
            for uid, rooms in known.items():
                entry = merged.setdefault(uid, [])
                if isinstance(entry, list):
                    entry.extend(r for r in rooms if r not in entry)
            if merged != current:
                await intent.set_account_data(EventType.DIRECT, merged)

    # --- helpers ----------------------------------------------------------------------------

    def _check_recipient(self, user_id: str) -> UserID:
        if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id) or len(user_id) > 255:
            raise InvalidParam(f"recipient {user_id!r} is not a Matrix user ID (@user:server)")
        if user_id == self.settings.bot_user_id or self.networks.parse_ghost(user_id):
            raise InvalidParam(f"recipient {user_id} is a user of this bridge, not a Matrix user")
        return UserID(user_id)

    async def _check_recipient_exists(self, user_id: UserID) -> None:
        if user_id.split(":", 1)[1] != self.settings.domain:
            return  # asking another server would cost a federation request; the invite will tell
        try:
            await self.appservice.intent.get_profile(user_id)
        except MatrixRequestError as e:
            # Synapse answers 404 with M_UNKNOWN ("No row found") for users that do not exist.
            if e.http_status == 404:
                raise UnknownRecipient(f"{user_id} does not exist on this homeserver") from None
            raise HomeserverError(f"the homeserver could not look up the recipient: {e!r}") from e
        except (TimeoutError, aiohttp.ClientError) as e:
            raise HomeserverError(f"the homeserver could not look up the recipient: {e!r}") from e

    async def _sync_profile(
        self, network: Network, remote_id: str, profile: Profile, name: str | None,
        avatar: str | None,
    ) -> None:
        """The ghost's name and avatar as the platform last said; no request when unchanged.

        Callers check ``profile.avatar`` (:meth:`_check_avatar`) before anything changes, so a
        refused avatar leaves no ghost, room or new name behind.
        """
        async with homeserver_errors("set the ghost's profile"):
            await self.ghosts.sync_displayname(network, remote_id, profile.name, name)
            if profile.avatar is not None and profile.avatar != avatar:
                await self.ghosts.set_avatar(network, remote_id, profile.avatar)

    async def _check_avatar(self, network: Network, avatar: str | None,
                            what: str = "sender_avatar") -> None:
        """An avatar must be an image the network uploaded; "" (remove) always passes."""
        if avatar:
            uploaded = await self.media.uploaded(network, avatar, what)
            if not uploaded.mimetype.startswith("image/"):
                raise InvalidParam(f"'{what}' must be an image, not {uploaded.mimetype}")

    async def _send_into(self, dm: DM, txn_id: str, content: dict[str, Any]) -> EventID:
        try:
            return await self.homeserver.send_event(
                dm.ghost_id, dm.room_id, "m.room.message", txn_id, content
            )
        except MForbidden:
            raise
        except (TimeoutError, MatrixRequestError, aiohttp.ClientError) as e:
            raise HomeserverError(f"the homeserver did not take the message: {e!r}") from e


