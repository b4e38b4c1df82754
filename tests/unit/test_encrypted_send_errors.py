"""A message the ghost's device cannot encrypt: a precise 502 for the platform, never a 500."""

from __future__ import annotations

from typing import Any

import pytest
from mautrix.errors import EncryptionError, MForbidden
from mautrix.types import DeviceID, RoomID, UserID

from dmbridge.errors import HomeserverError
from dmbridge.homeserver import Homeserver
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.settings import AS_TOKEN


@pytest.mark.parametrize("failure", [
    EncryptionError("no group session created"),
    MForbidden(403, "device creation refused"),
])
async def test_an_encryption_failure_is_a_homeserver_error(hs: FakeHomeserver,
                                                           failure: Exception) -> None:
    homeserver = Homeserver(hs.url, AS_TOKEN, [])

    async def encrypt(*_: Any) -> tuple[str, dict[str, Any], DeviceID]:
        raise failure

    homeserver.encrypt = encrypt
    try:
        with pytest.raises(HomeserverError) as info:
            await homeserver.send_event(UserID("@dm_sms_1:localhost"), RoomID("!r:localhost"),
                                        "m.room.message", "txn-1", {"body": "hi"})
    finally:
        await homeserver.close()
    assert (info.value.status, info.value.errcode) == (502, "DMBRIDGE_HOMESERVER_ERROR")
    assert str(info.value).startswith("the message could not be encrypted for the room: ")
    assert not [n for n in hs.names() if "send" in n]  # nothing went out unencrypted
