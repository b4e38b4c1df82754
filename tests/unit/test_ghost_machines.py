"""The ghosts' crypto machines: one per ghost for as long as anything uses it."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import aiohttp
import pytest
from mautrix.util.async_db import Scheme

from dmbridge import encryption as encryption_module
from dmbridge.db import Stores
from dmbridge.encryption import CRYPTO_UPGRADE_TABLE, Encryption
from dmbridge.networks import Networks
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.settings import AS_TOKEN, PICKLE_KEY

GHOST_A, GHOST_B = "@dm_sms_1:localhost", "@dm_sms_2:localhost"


@pytest.fixture
async def encryption(stores: Stores, hs: FakeHomeserver, monkeypatch: pytest.MonkeyPatch
                     ) -> AsyncIterator[Encryption]:
    monkeypatch.setattr(encryption_module, "MACHINES_MAX", 1)  # one machine cached
    if stores.db.scheme != Scheme.SQLITE:  # emptied, with its version, by ``stores``: anew
        for row in await stores.db.fetch("SELECT tablename FROM pg_tables WHERE"
                                         " schemaname = 'public' AND tablename LIKE 'crypto%'"):
            await stores.db.execute(f"DROP TABLE {row['tablename']} CASCADE")
    await CRYPTO_UPGRADE_TABLE.upgrade(stores.db)
    async with aiohttp.ClientSession() as session:
        yield Encryption(mode="allow", pickle_key=PICKLE_KEY, homeserver_url=hs.url,
                         as_token=AS_TOKEN, db=stores.db, stores=stores, networks=Networks([]),
                         session=lambda: session)


async def test_a_machine_in_use_is_handed_out_again_after_leaving_the_cache(
    encryption: Encryption, hs: FakeHomeserver,
) -> None:
    in_use = await encryption.machine(GHOST_A)
    await encryption.machine(GHOST_B)  # takes the cache's one place
    again = await encryption.machine(GHOST_A)
    assert again is in_use  # not a second machine ratcheting its own copy of the keys
    assert hs.names().count("PUT device") == 2  # one device per ghost


async def test_a_machine_no_longer_used_is_made_again_from_the_database(
    encryption: Encryption, hs: FakeHomeserver,
) -> None:
    machine = await encryption.machine(GHOST_A)
    assert machine is not None
    identity = machine.account.identity_key if machine.account else None
    del machine
    await encryption.machine(GHOST_B)
    gc.collect()
    again = await encryption.machine(GHOST_A)
    assert again is not None and again.account is not None
    assert again.account.identity_key == identity
    assert hs.names().count("PUT device") == 2
