"""The Python API of the bridge: send into the DM of a ghost and a Matrix user (opened or
reused by :mod:`dmbridge.opening`), react, delete, set profiles, typing and read receipts."""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import re
from dataclasses import dataclass
from typing import Any

import aiohttp
from mautrix.api import Method, Path
from mautrix.appservice import AppService
from mautrix.errors import MatrixConnectionError, MatrixRequestError, MForbidden
from mautrix.types import EventID, RoomID, UserID

from .config import Settings
from .db import Stores, now_ms
from .db.dm import ACTIVE, DECLINED
from .db.media import Media
from .db.message import EDIT, MESSAGE, REACTION, SentMessage
from .encryption import Encryption
from .errors import (
    HomeserverError,
    InvalidParam,
    NotFound,
    NotPermitted,
    TooLarge,
    storable,
)
from .formatting import compose
from .ghosts import Ghosts
from .homeserver import Homeserver
from .instances import Instances
from .lifecycle import clear_declined
from .media import MediaService, content_info, msgtype_for
from .networks import Network
from .opening import DM, NoNewRoom, OpenedDM, Opener, Profile, declined, homeserver_errors
from .ratelimit import Pacing
from .relations import (
    IN_THREAD,
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
    thread_content,
    thread_refused,
    with_article,
)
from .timestamps import check_origin_ts

log = logging.getLogger("dmbridge.dms")

__all__ = ["DM", "DMService", "OpenedDM", "SendResult", "txn_id_for"]

_USER_ID = re.compile(r"@[\x21-\x39\x3b-\x7e]+:[A-Za-z0-9.\-\[\]:]+")
MAX_CONTENT_BYTES = 60_000  # below the homeserver's 64 KiB event limit, leaving room for the rest


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


class DMService:
    """The Python API of the bridge: open_dm, send, list_dms."""

    def __init__(
        self, *, settings: Settings, stores: Stores, appservice: AppService, ghosts: Ghosts,
        homeserver: Homeserver, media: MediaService, instances: Instances, pacing: Pacing,
        encryption: Encryption | None = None,
    ) -> None:
        self.settings = settings
        self.media = media
        self.networks = settings.networks
        self.stores = stores
        self.appservice = appservice
        self.ghosts = ghosts
        self.homeserver = homeserver
        self.opener = Opener(settings=settings, stores=stores, appservice=appservice,
                             ghosts=ghosts, instances=instances, pacing=pacing,
                             encryption=encryption)

    # --- the Python API ---------------------------------------------------------------------

    async def open_dm(
        self, network_id: str, remote_id: str, user_id: str, *, sender_name: str | None = None,
        sender_avatar: str | None = None, new: bool = False, replaces: str | None = None,
    ) -> OpenedDM:
        """The pair's usable DM, opened if there is none. ``new=True`` ends the current DM
        (the ghost leaves it, see :meth:`Opener._replace`) and opens a fresh one; ``replaces``
        (a room ID) makes that conditional on the current DM being that room, so a retry of
        the same request does not replace the room the first try made."""
        if replaces is not None and not new:
            raise InvalidParam("'replaces' goes with 'new': true")
        if replaces is not None and not replaces.startswith("!"):
            raise InvalidParam(f"'replaces' must be a room ID (starting with '!'), not"
                               f" {replaces!r}")
        network = self.networks.get(network_id)
        ghost_id = network.ghost_user_id(remote_id)
        recipient = self._check_recipient(user_id)
        _check_permitted(network, recipient)
        record = await self.stores.dms.get_current(ghost_id, recipient)
        if record is None or sender_avatar != record.ghost_avatar_url:
            await self._check_avatar(network, sender_avatar)  # before a room or a ghost exists
        profile = Profile(sender_name, sender_avatar)
        return await self.opener.open(network, remote_id, ghost_id, recipient, profile, record,
                                      replace=new,
                                      replaces=RoomID(replaces) if replaces is not None
                                      else None)

    async def send(
        self, network_id: str, remote_id: str, user_id: str, *, message_id: str,
        text: str | None = None, html: str | None = None, markdown: str | None = None,
        msgtype: str = "text", sender_name: str | None = None, sender_avatar: str | None = None,
        media: str | None = None, reply_to: Target | None = None, edits: str | None = None,
        thread_root: Target | None = None, ts: int | None = None,
    ) -> SendResult:
        """Send a message from a remote user; ``html`` is sanitised, ``markdown`` rendered.

        ``media`` is a content URI the network uploaded (the text becomes its caption);
        ``reply_to`` makes it a reply, ``edits`` (one of the sender's message IDs) an edit,
        ``thread_root`` a message in that message's thread; ``ts`` is the time it was written
        (milliseconds since the epoch), which the Matrix event shows.
        """
        network = self.networks.get(network_id)
        ghost_id = network.ghost_user_id(remote_id)
        recipient = self._check_recipient(user_id)
        _check_message_id(message_id)
        if edits is not None and (reply_to is not None or media is not None
                                  or thread_root is not None):
            raise InvalidParam("an edit replaces a message's text; it takes no reply_to,"
                               " thread_root or media")
        if ts is not None:
            check_origin_ts(ts, now_ms())
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
        thread = None
        if thread_root is not None:
            thread = await resolve(self.stores, network.id, remote_id, recipient, thread_root,
                                   purpose=IN_THREAD)
            check_room(thread, record.room_id if record else None, thread_root, IN_THREAD)
        if record is None or sender_avatar != record.ghost_avatar_url:
            await self._check_avatar(network, sender_avatar)  # before a room or a ghost exists
        profile = Profile(sender_name, sender_avatar)
        try:  # a reply, edit or reaction belongs in the room of its target: never a new one
            opened = await self.opener.open(network, remote_id, ghost_id, recipient, profile,
                                            record, new_room=resolved is None and thread is None)
        except NoNewRoom:
            if resolved is not None and target is not None:
                check_room(resolved, None, target, purpose)
            if thread is not None and thread_root is not None:
                check_room(thread, None, thread_root, IN_THREAD)
            raise
        if resolved is not None and target is not None:
            check_room(resolved, opened.dm.room_id, target, purpose)
        if thread is not None and thread_root is not None:
            check_room(thread, opened.dm.room_id, thread_root, IN_THREAD)
        if edits is not None and resolved is not None:
            content = edit_content(content, resolved.event_id)
        elif thread is not None:
            content = thread_content(content, thread.event_id,
                                     resolved.event_id if resolved is not None else None)
        elif resolved is not None:
            content = reply_content(content, resolved.event_id)
        txn_id = txn_id_for(network.id, remote_id, message_id)
        try:
            event_id = await self._send_into(opened.dm, txn_id, content, ts)
        except HomeserverError as e:
            if thread_root is not None and thread_refused(e):
                raise InvalidParam(f"{thread_root} is itself in a thread; give the thread's"
                                   " root as thread_root") from e
            raise
        except MForbidden as e:
            if resolved is not None or thread is not None:  # a new room would not hold it
                raise HomeserverError(f"the homeserver refused the message: {e}") from e
            # Our view of the room was behind the homeserver's: retire the room, open afresh.
            log.warning("send into %s refused (%s); opening a new DM", opened.dm.room_id, e)
            await self.stores.dms.end(opened.dm.room_id, now_ms())
            opened = await self.open_dm(network.id, remote_id, user_id, sender_name=sender_name,
                                        sender_avatar=sender_avatar)
            try:
                event_id = await self._send_into(opened.dm, txn_id, content, ts)
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
            raise declined(record)
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
        await self.opener.sync_profile(network, remote_id, Profile(name, avatar),
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

    async def add_to_m_direct(self, ghost_id: UserID, user_id: UserID, room_id: RoomID) -> None:
        """Read, merge, write the ghost's m.direct: other entries are never lost."""
        await self.opener.add_to_m_direct(ghost_id, user_id, room_id)

    async def recover_unfinished(self) -> int:
        """Settle the DM creations that a process which died left unfinished."""
        return await self.opener.recover_unfinished()

    async def finish_replacements(self) -> int:
        """The ghost leaves the rooms its DMs were replaced from that it is still in."""
        return await self.opener.finish_replacements()

    async def settle_if_gone(self, ghost_id: UserID, user_id: UserID) -> bool:
        """Settle the pair's DM creation if the process that began it is gone."""
        return await self.opener.settle_if_gone(ghost_id, user_id)

    # --- helpers ----------------------------------------------------------------------------

    def _check_recipient(self, user_id: str) -> UserID:
        if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id) or len(user_id) > 255:
            raise InvalidParam(f"recipient {user_id!r} is not a Matrix user ID (@user:server)")
        if user_id == self.settings.bot_user_id or self.networks.parse_ghost(user_id):
            raise InvalidParam(f"recipient {user_id} is a user of this bridge, not a Matrix user")
        return UserID(user_id)

    async def _check_avatar(self, network: Network, avatar: str | None,
                            what: str = "sender_avatar") -> None:
        """An avatar must be an image the network uploaded; "" (remove) always passes."""
        if avatar:
            uploaded = await self.media.uploaded(network, avatar, what)
            if not uploaded.mimetype.startswith("image/"):
                raise InvalidParam(f"'{what}' must be an image, not {uploaded.mimetype}")

    async def _send_into(self, dm: DM, txn_id: str, content: dict[str, Any],
                         ts: int | None = None) -> EventID:
        try:
            return await self.homeserver.send_event(
                dm.ghost_id, dm.room_id, "m.room.message", txn_id, content, ts=ts
            )
        except MForbidden:
            raise
        except (TimeoutError, MatrixRequestError, MatrixConnectionError, aiohttp.ClientError) as e:
            raise HomeserverError(f"the homeserver did not take the message: {e!r}") from e


