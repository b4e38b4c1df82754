"""End-to-end encrypted DMs: each ghost in an encrypted room has a device of its own.

A ghost's device is made the first time it needs one (MSC4190: the appservice creates it, no
login), and its Olm account, sessions and the user's device keys are kept in the bridge's own
database (mautrix's crypto store, one account per ghost). Requests are made as that device
(``?user_id=…&device_id=…``). The homeserver puts what each device is sent into the
appservice's transactions: to-device events (MSC2409), one-time key counts and device list
changes (MSC3202); :meth:`Encryption.intake` hands each to the right ghost's machine and
decrypts the room's encrypted events before the bridge records them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp
from mautrix.api import HTTPAPI
from mautrix.client import Client
from mautrix.crypto import OlmMachine
from mautrix.crypto.attachments import decrypt_attachment, encrypt_attachment
from mautrix.crypto.store import StateStore
from mautrix.crypto.store.asyncpg import PgCryptoStore
from mautrix.errors import (
    DecryptionError,
    DeviceValidationError,
    EncryptionError,
    MatrixConnectionError,
    MatrixError,
    MatrixRequestError,
    SessionNotFound,
)
from mautrix.types import (
    JSON,
    ASToDeviceEvent,
    ContentURI,
    DecryptedOlmEvent,
    DeviceID,
    DeviceLists,
    DeviceOTKCount,
    EncryptedEvent,
    EventID,
    EventType,
    RoomEncryptionStateEventContent,
    RoomID,
    SerializerError,
    UserID,
)
from mautrix.util.async_db import Database, UpgradeTable
from olm.group_session import OlmGroupSessionError
from olm.session import OlmSessionError

from .db import Stores, now_ms
from .locks import KeyedLocks
from .lru import LRU
from .networks import Networks

log = logging.getLogger("dmbridge.encryption")
# mautrix's machines log here: e.g. a warning each time a user's devices turn out not to be
# cross-signed, which is usual for a user who never verified.
machine_log = logging.getLogger("dmbridge.encryption.olm")

# mautrix's crypto store keeps its own schema version (``crypto_version``) beside ours.
CRYPTO_UPGRADE_TABLE: UpgradeTable = PgCryptoStore.upgrade_table
DEVICE_NAME = "dmbridge"
# Ghosts whose machine (account, sessions cached) is kept in memory.
MACHINES_MAX = 1_000
MEGOLM = "m.megolm.v1.aes-sha2"
# To-device events handled are remembered this long (a resent transaction brings them again),
# the old ones deleted at most this often.
HANDLED_KEPT_MS = 7 * 86_400_000
HANDLED_PRUNE_EVERY_MS = 3_600_000
DECRYPTED_KEPT = 1_000
# What a to-device event can fail with that is the event's own fault (not the database's).
CRYPTO_ERRORS = (DecryptionError, DeviceValidationError, SerializerError, OlmSessionError,
                 OlmGroupSessionError, ValueError, KeyError, TypeError)
ENCRYPTION_CONTENT = {"algorithm": MEGOLM}  # of the rooms the bridge encrypts
# Transaction fields, under the stable name first, then the unstable names Synapse sends.
TO_DEVICE = ("to_device", "de.sorunome.msc2409.to_device")
OTK_COUNTS = ("device_one_time_keys_count", "org.matrix.msc3202.device_one_time_keys_count",
              "org.matrix.msc3202.device_one_time_key_counts")
DEVICE_LISTS = ("device_lists", "org.matrix.msc3202.device_lists")


def device_id_for(ghost_id: str) -> DeviceID:
    """The ghost's device ID: derived from the ghost, so every worker names the same one."""
    return DeviceID("DMB" + hashlib.sha256(ghost_id.encode()).hexdigest()[:10].upper())


def _may_pass(e: Exception) -> bool:
    """A homeserver failure that may pass if the request is made again later."""
    if isinstance(e, aiohttp.ClientError | MatrixConnectionError):
        return True
    return isinstance(e, MatrixRequestError) and (e.http_status >= 500 or e.http_status == 429)


def _first(body: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if name in body:
            return body[name]
    return None


class RoomEncryptionState(StateStore):
    """What the crypto machines ask about rooms, answered from the bridge's tables."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores

    async def is_encrypted(self, room_id: RoomID) -> bool:
        return await self.stores.encrypted_rooms.get(room_id) is not None

    async def get_encryption_info(self, room_id: RoomID
                                  ) -> RoomEncryptionStateEventContent | None:
        content = await self.stores.encrypted_rooms.get(room_id)
        if content is None:
            return None
        return RoomEncryptionStateEventContent.deserialize(cast(JSON, content))

    async def find_shared_rooms(self, user_id: UserID) -> list[RoomID]:
        return await self.stores.encrypted_rooms.shared_with(user_id)


class GhostMachine(OlmMachine):
    """A ghost's machine. The user's device list is one for all ghosts (mautrix's device
    tables are not per account), so a change seen through one ghost's machine makes every
    ghost in a DM with the user share a new room key: each DM's outbound session goes,
    whichever ghost's it is."""

    async def on_devices_changed(self, user_id: UserID) -> None:
        rooms = await self.state_store.find_shared_rooms(user_id)
        store = cast(PgCryptoStore, self.crypto_store)
        for room_id in rooms:
            await store.db.execute(
                "DELETE FROM crypto_megolm_outbound_session WHERE room_id = $1", room_id)
        if rooms:
            log.info("devices of %s changed: a new room key for its %d encrypted DM(s)",
                     user_id, len(rooms))


class Encryption:
    """The ghosts' devices: made on demand, fed from transactions, encrypting and decrypting."""

    def __init__(self, *, mode: str, pickle_key: str, homeserver_url: str, as_token: str,
                 db: Database,
                 stores: Stores, networks: Networks,
                 session: Callable[[], aiohttp.ClientSession]) -> None:
        self.mode = mode
        self.pickle_key = pickle_key  # the Olm pickles are encrypted with it (dm.pickle_key)
        self.homeserver_url = homeserver_url
        self.as_token = as_token
        self.db = db
        self.stores = stores
        self.networks = networks
        self._session = session
        self.state = RoomEncryptionState(stores)
        self._machines: LRU[str, OlmMachine] = LRU(MACHINES_MAX)
        self._in_use: weakref.WeakValueDictionary[str, OlmMachine] = (
            weakref.WeakValueDictionary())
        self._locks: KeyedLocks[str] = KeyedLocks()
        self._sharing: KeyedLocks[RoomID] = KeyedLocks()  # one key share per room at a time
        self._pruned_at = 0  # ms: when handled_to_device last lost its old rows
        # Olm messages decrypted whose room key could not be stored yet: (ghost, message).
        self._kept: LRU[str, tuple[str, DecryptedOlmEvent]] = LRU(DECRYPTED_KEPT)
        # Told when to-device events (room keys among them) were handled.
        self.on_keys: Callable[[], None] = lambda: None

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def encrypts_new_rooms(self) -> bool:
        return self.mode in ("default", "require")

    # --- devices ----------------------------------------------------------------------------

    async def machine(self, ghost_id: str, *, create: bool = True) -> OlmMachine | None:
        """The ghost's machine; its device is made (and its keys uploaded) on first need.
        With ``create=False``, None for a ghost that has no device yet."""
        if (machine := self._cached(ghost_id)) is not None:
            return machine
        async with self._locks.hold(ghost_id):
            if (machine := self._cached(ghost_id)) is not None:
                return machine
            store = PgCryptoStore(ghost_id, self.pickle_key, self.db)
            device_id = await store.get_device_id()
            if not device_id and not create:
                return None
            api = HTTPAPI(self.homeserver_url, self.as_token, client_session=self._session(),
                          as_user_id=UserID(ghost_id), log=log)  # type: ignore[arg-type]
            client = Client(mxid=UserID(ghost_id), api=api)
            machine = GhostMachine(client, store, self.state,
                                   log=machine_log)  # type: ignore[arg-type]
            # Keys go to every device of the user, verified or not: they are the user's own.
            machine.share_keys_min_trust = machine.send_keys_min_trust
            if not device_id:
                device_id = device_id_for(ghost_id)
                await store.put_device_id(device_id)
            client.device_id = device_id
            await machine.load()  # the Olm account, made and stored on first use
            assert machine.account is not None
            if not machine.account.shared:
                await client.create_device_msc4190(device_id, DEVICE_NAME)
                await machine.share_keys()
                log.info("%s: device %s made and its keys uploaded", ghost_id, device_id)
            api.as_device_id = device_id
            self._machines[ghost_id] = self._in_use[ghost_id] = machine
            return machine

    def _cached(self, ghost_id: str) -> OlmMachine | None:
        """The ghost's machine if one is cached, or still in use (a send, a decryption) after
        it left the cache: never a second machine for the same account, which would ratchet
        its own copy of the keys."""
        machine = self._machines.get(ghost_id)
        if machine is None and (machine := self._in_use.get(ghost_id)) is not None:
            self._machines[ghost_id] = machine
        return machine

    # --- what the homeserver sends ------------------------------------------------------------

    async def intake(self, body: dict[str, Any], events: list[Any]) -> list[Any]:
        """Feed a transaction's to-device events, key counts and device list changes to the
        ghosts' machines, then return ``events`` with encrypted room events decrypted (those
        that cannot be stay as they are). Never raises for one bad item: it is logged."""
        if not self.enabled:
            return events
        to_device = _first(body, TO_DEVICE) or []
        for raw in to_device:
            await self._to_device(raw)
        if to_device:
            self.on_keys()  # messages waiting for a room key are tried again
        counts = _first(body, OTK_COUNTS)
        if isinstance(counts, dict):
            await self._otk_counts(counts)
        lists = _first(body, DEVICE_LISTS)
        if isinstance(lists, dict):
            await self._device_lists(lists)
        return [await self._room_event(raw) for raw in events]

    async def _to_device(self, raw: Any) -> None:
        """Hand one to-device event to its ghost's device, once (a resent transaction may
        bring it again). An event the device cannot use is logged; a failure of the database
        before the event is decrypted goes up (the transaction is answered 500), one after
        keeps the room key to be stored again (see :meth:`_store_kept`)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("to_user_id"), str):
            return
        machine = await self.machine(raw["to_user_id"], create=False)
        if machine is None:
            log.debug("to-device %s for %s, which has no device", raw.get("type"),
                      raw.get("to_user_id"))
            return
        digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
        if await self.db.fetchval("SELECT 1 FROM handled_to_device WHERE digest = $1",
                                  digest) is not None:
            log.debug("to-device %s from %s to %s already handled", raw.get("type"),
                      raw.get("sender"), raw.get("to_user_id"))
            return
        try:
            event = cast(ASToDeviceEvent, ASToDeviceEvent.deserialize(cast(JSON, raw)))
            if (event.type == EventType.TO_DEVICE_ENCRYPTED
                    and event.to_device_id == machine.client.device_id):
                decrypted = await machine._decrypt_olm_event(event)
                # Decrypting moved the Olm session on for good: the message cannot be
                # decrypted again, so what it holds is kept until it is stored.
                self._kept[digest] = (raw["to_user_id"], decrypted)
                await self._store_kept(digest)
                return
            await machine.handle_as_to_device_event(event)
        except CRYPTO_ERRORS as e:
            log.warning("to-device event %s from %s to %s could not be used: %s",
                        raw.get("type"), raw.get("sender"), raw.get("to_user_id"), e)
        await self._handled(digest)

    async def _store_kept(self, digest: str) -> bool:
        """Store a decrypted Olm message's room key (as mautrix's ``handle_to_device_event``
        does). A failure of the database keeps it for :meth:`store_kept_keys`: the homeserver
        does not send to-device events again (Synapse drops them from a resent transaction)."""
        ghost_id, decrypted = self._kept[digest]
        try:
            machine = await self.machine(ghost_id, create=False)
            assert machine is not None
            if decrypted.type == EventType.ROOM_KEY:
                await machine._receive_room_key(decrypted)
            elif decrypted.type == EventType.FORWARDED_ROOM_KEY:
                await machine._receive_forwarded_room_key(decrypted)
            self._kept.pop(digest, None)
            await self._handled(digest)
        except CRYPTO_ERRORS as e:
            self._kept.pop(digest, None)
            log.warning("%s: %s from %s could not be used: %s", ghost_id, decrypted.type,
                        decrypted.sender, e)
        except Exception:
            log.exception("%s: %s from %s could not be stored; kept to be stored again",
                          ghost_id, decrypted.type, decrypted.sender)
            return False
        return True

    @property
    def keys_kept(self) -> bool:
        return len(self._kept) > 0

    async def store_kept_keys(self) -> None:
        """Store again the room keys that could not be stored when they came."""
        for digest in list(self._kept):
            await self._store_kept(digest)

    async def _handled(self, digest: str) -> None:
        now = now_ms()
        await self.db.execute(
            "INSERT INTO handled_to_device (digest, handled_at) VALUES ($1, $2)"
            " ON CONFLICT (digest) DO NOTHING", digest, now)
        if now - self._pruned_at >= HANDLED_PRUNE_EVERY_MS:
            self._pruned_at = now
            await self.db.execute("DELETE FROM handled_to_device WHERE handled_at < $1",
                                  now - HANDLED_KEPT_MS)

    async def _otk_counts(self, counts: dict[str, Any]) -> None:
        for ghost_id, devices in counts.items():
            try:
                machine = await self.machine(ghost_id, create=False)
                if machine is None or not isinstance(devices, dict):
                    continue
                count = devices.get(machine.client.device_id)
                if isinstance(count, dict):
                    await machine.handle_otk_count(DeviceOTKCount.deserialize(cast(JSON, count)))
            except Exception:
                log.exception("one-time keys of %s could not be replenished", ghost_id)

    async def _device_lists(self, lists: dict[str, Any]) -> None:
        """The user's devices are asked for once, through any one of its ghosts' machines
        (the device list is shared by all); see :class:`GhostMachine`."""
        changed = [u for u in lists.get("changed") or [] if isinstance(u, str)]
        for user_id in changed:
            if self.networks.parse_ghost(user_id) is not None:
                continue
            for ghost_id in await self._ghosts_of(UserID(user_id)):
                try:
                    machine = await self.machine(ghost_id, create=False)
                    if machine is None:
                        continue
                    await machine.handle_device_lists(DeviceLists(changed=[UserID(user_id)]))
                except Exception:
                    log.exception("device list of %s could not be updated for %s", user_id,
                                  ghost_id)
                    continue
                break

    async def _ghosts_of(self, user_id: UserID) -> list[str]:
        rows = await self.db.fetch(
            "SELECT DISTINCT dm.ghost_id FROM dm JOIN encrypted_room e ON e.room_id = dm.room_id"
            " WHERE dm.user_id = $1 AND dm.state <> 'ended'", user_id)
        return [str(row["ghost_id"]) for row in rows]

    async def _room_event(self, raw: Any) -> Any:
        if not isinstance(raw, dict) or not isinstance(raw.get("room_id"), str):
            return raw
        kind = raw.get("type")
        if kind == "m.room.encryption" and raw.get("state_key") == "":
            await self._turned_on(raw["room_id"], raw.get("content"))
        elif kind == "m.room.member":
            await self._invited(raw)
        elif kind == "m.room.encrypted":
            return await self.decrypt(raw)
        return raw

    async def _record(self, room_id: str, content: Any) -> None:
        if await self.stores.encrypted_rooms.get(RoomID(room_id)) is not None:
            return  # known (the first content stays)
        if isinstance(content, dict) and content.get("algorithm") == MEGOLM:
            await self.stores.encrypted_rooms.record(None, RoomID(room_id), content, now_ms())

    async def _turned_on(self, room_id: str, content: Any) -> None:
        """Encryption turned on in a room: a DM's ghost gets its device now, so it can read
        the user's next message."""
        await self._record(room_id, content)
        ghost_id = await self.stores.encrypted_rooms.ghost_of(RoomID(room_id))
        if ghost_id is None or await self.stores.encrypted_rooms.get(RoomID(room_id)) is None:
            return
        try:
            await self.machine(ghost_id)
        except Exception:
            log.exception("%s: no device could be made for %s", room_id, ghost_id)

    async def _invited(self, raw: dict[str, Any]) -> None:
        """A ghost invited to an encrypted room: the room is known as encrypted (its device
        is made only once the invite is accepted, see :meth:`before_join`)."""
        ghost_id = raw.get("state_key")
        content = raw.get("content")
        if (not isinstance(ghost_id, str) or not isinstance(content, dict)
                or content.get("membership") != "invite"
                or self.networks.parse_ghost(ghost_id) is None):
            return
        unsigned = raw.get("unsigned") if isinstance(raw.get("unsigned"), dict) else {}
        for state in (unsigned or {}).get("invite_room_state") or []:
            if isinstance(state, dict) and state.get("type") == "m.room.encryption":
                await self._record(raw["room_id"], state.get("content"))

    async def before_join(self, ghost_id: UserID, room_id: RoomID) -> None:
        """A ghost about to join a room it accepted: in an encrypted room it gets its device
        first, so the user's first message is encrypted for it too. A failure is logged (the
        device is made again when the ghost next needs it)."""
        if await self.stores.encrypted_rooms.get(room_id) is None:
            return
        try:
            await self.machine(ghost_id)
        except Exception:
            log.exception("%s: no device could be made for %s", room_id, ghost_id)

    async def decrypt(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The event decrypted, with the encrypted event's ID, sender and time; the encrypted
        event itself if it cannot be (no device, no key)."""
        sender = raw.get("sender")
        if not isinstance(sender, str) or self.networks.parse_ghost(sender) is not None:
            return raw  # a ghost's own message, coming back
        await self._record(raw["room_id"], {"algorithm": MEGOLM})  # it is encrypted, evidently
        ghost_id = await self.stores.encrypted_rooms.ghost_of(RoomID(raw["room_id"]))
        if ghost_id is None:
            return raw
        try:
            machine = await self.machine(ghost_id, create=False)
            if machine is None:
                return raw
            event = await machine.decrypt_megolm_event(EncryptedEvent.deserialize(cast(JSON, raw)))
            decrypted = event.serialize()
        except (DecryptionError, SessionNotFound, MatrixError, ValueError, KeyError,
                RecursionError) as e:  # RecursionError: plaintext nested too deep to read
            log.warning("%s: %s from %s cannot be decrypted by %s: %s", raw["room_id"],
                        raw.get("event_id"), sender, ghost_id, type(e).__name__ if isinstance(
                            e, RecursionError) else e)
            return raw
        content = await self._readable_media(machine.client, decrypted["content"])
        plain = {**raw, "type": decrypted["type"], "content": content}
        log.debug("%s: %s decrypted (%s)", raw["room_id"], raw.get("event_id"), plain["type"])
        return plain

    async def _readable_media(self, client: Client, content: dict[str, Any]) -> dict[str, Any]:
        """An encrypted attachment as a plain copy (``url``), which the platform's media link
        serves; left as it is (the platform gets no media) if it cannot be. A failure that may
        pass (the homeserver unreachable, a 5xx or 429) goes up: the transaction is answered
        500 and the homeserver sends the message again."""
        file = content.get("file")
        if not isinstance(file, dict) or not isinstance(file.get("url"), str):
            return content
        info = content.get("info") if isinstance(content.get("info"), dict) else {}
        mimetype = (info or {}).get("mimetype")
        try:
            data = await client.download_media(ContentURI(file["url"]))
            plain = await asyncio.to_thread(decrypt_attachment, data, file["key"]["k"],
                                            file["hashes"]["sha256"], file["iv"])
            url = await client.upload_media(plain, mime_type=mimetype if isinstance(
                mimetype, str) else None, size=len(plain))
        except (MatrixError, DecryptionError, aiohttp.ClientError, KeyError, TypeError,
                ValueError) as e:
            if _may_pass(e):
                log.warning("encrypted media %s could not be fetched or stored for now (%s);"
                            " the message is taken again", file.get("url"), e)
                raise
            log.warning("encrypted media %s could not be decrypted: %s", file.get("url"), e)
            return content
        return {**{k: v for k, v in content.items() if k != "file"}, "url": url}

    # --- what the bridge sends ----------------------------------------------------------------

    async def encrypt(self, ghost_id: str, room_id: RoomID, event_type: str,
                      content: dict[str, Any]) -> tuple[str, dict[str, Any], DeviceID] | None:
        """``(type, content, device)`` to send instead, or None for a room not encrypted (or
        encryption off). The room's key is shared with the user's devices when there is none
        (first message, a new device, a rotation)."""
        if not self.enabled or await self.stores.encrypted_rooms.get(room_id) is None:
            return None
        machine = await self.machine(ghost_id)
        assert machine is not None
        content = await self._encrypted_media(machine.client, content)
        kind = EventType.find(event_type, EventType.Class.MESSAGE)
        try:
            encrypted = await machine.encrypt_megolm_event(room_id, kind, content)
        except EncryptionError:
            await self._share(machine, room_id)
            encrypted = await machine.encrypt_megolm_event(room_id, kind, content)
        return "m.room.encrypted", encrypted.serialize(), machine.client.device_id

    async def _encrypted_media(self, client: Client, content: dict[str, Any]
                               ) -> dict[str, Any]:
        """Media (and its thumbnail) as an encrypted copy: ``file`` instead of ``url``."""
        if isinstance(url := content.get("url"), str) and url.startswith("mxc://"):
            content = {k: v for k, v in content.items() if k != "url"}
            content["file"] = await self._encrypted_copy(client, url)
        info = content.get("info")
        if isinstance(info, dict) and isinstance(thumb := info.get("thumbnail_url"), str):
            info = {k: v for k, v in info.items() if k != "thumbnail_url"}
            info["thumbnail_file"] = await self._encrypted_copy(client, thumb)
            content = {**content, "info": info}
        return content

    @staticmethod
    async def _encrypted_copy(client: Client, url: str) -> dict[str, Any]:
        """The media encrypted (AES-CTR, as attachments are) and uploaded again: the ``file``
        object that lets the user's client fetch and decrypt it."""
        data = await client.download_media(ContentURI(url))
        ciphertext, file = await asyncio.to_thread(encrypt_attachment, data)
        file.url = await client.upload_media(ciphertext, mime_type="application/octet-stream",
                                             size=len(ciphertext))
        serialized: dict[str, Any] = file.serialize()
        return serialized

    async def _share(self, machine: OlmMachine, room_id: RoomID) -> None:
        async with self._sharing.hold(room_id):
            current = await machine.crypto_store.get_outbound_group_session(room_id)
            if current is not None and current.shared and not current.expired:
                return  # shared meanwhile
            user_id = await self.stores.encrypted_rooms.user_of(room_id)
            users = [UserID(user_id)] if user_id else []
            await machine.share_group_session(room_id, users)


UNDECRYPTABLE_NOTICE = ("⚠️ Your message was not delivered: it is encrypted and the bridge could"
                        " not decrypt it.")


async def tell_undecryptable(
    send: Callable[[UserID, RoomID, str, str, dict[str, Any]], Awaitable[EventID]],
    items: list[tuple[str, str, str]],
) -> None:
    """A notice from the ghost in each room, answering the message the contact did not get
    (encrypted too where the ghost has a device). Never raises: a failure is logged."""
    for ghost_id, room_id, event_id in items:
        content = {"msgtype": "m.notice", "body": UNDECRYPTABLE_NOTICE,
                   "m.relates_to": {"m.in_reply_to": {"event_id": event_id}}}
        txn_id = "dmbridge-undecryptable-" + hashlib.sha256(event_id.encode()).hexdigest()[:32]
        try:
            await send(UserID(ghost_id), RoomID(room_id), "m.room.message", txn_id, content)
        except Exception as e:
            log.warning("%s: could not tell the user that %s was not delivered: %s", room_id,
                        event_id, e)
