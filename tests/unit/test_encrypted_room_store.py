"""Which rooms are encrypted, as the send path asks it for every message."""

from __future__ import annotations

from mautrix.types import RoomID, UserID

from dmbridge.db import Stores, now_ms
from dmbridge.db.encrypted_room import EncryptedRoomStore

GHOST, USER = UserID("@dm_sms_1:example.org"), UserID("@alice:example.org")
ROOM = RoomID("!dm:example.org")
MEGOLM = {"algorithm": "m.megolm.v1.aes-sha2"}


async def test_a_room_is_encrypted_once_recorded_and_keeps_its_first_content(
    stores: Stores,
) -> None:
    rooms = stores.encrypted_rooms
    assert await rooms.get(ROOM) is None
    await rooms.record(None, ROOM, {**MEGOLM, "rotation_period_msgs": 2}, now_ms())
    await rooms.record(None, ROOM, MEGOLM, now_ms())
    assert await rooms.get(ROOM) == {**MEGOLM, "rotation_period_msgs": 2}
    # Another store over the same database (the bridge after a restart) reads it back.
    assert await EncryptedRoomStore(stores.db).get(ROOM) == {**MEGOLM, "rotation_period_msgs": 2}


async def test_the_dms_of_an_encrypted_room_name_its_ghost_and_user(stores: Stores) -> None:
    claim = "claim-encrypted"
    assert await stores.dms.claim(GHOST, USER, "sms", "1", claim, "test", now_ms())
    assert await stores.dms.activate(GHOST, USER, claim, ROOM, now_ms())
    rooms = stores.encrypted_rooms
    assert await rooms.shared_with(USER) == []
    await rooms.record(None, ROOM, MEGOLM, now_ms())
    assert await rooms.shared_with(USER) == [ROOM]
    assert (await rooms.ghost_of(ROOM), await rooms.user_of(ROOM)) == (GHOST, USER)
    assert await rooms.ghost_of(RoomID("!other:example.org")) is None
