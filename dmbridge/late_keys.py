"""The users' encrypted messages whose room key comes after them.

The homeserver sends room keys (to-device) and room events on separate streams, so a key can
come in a transaction after its message's. Such a message is recorded as waiting (in the
transaction that brings it, so it survives a restart), the transaction is answered, and the
message is decrypted again each time keys come. Once it has waited :data:`KEY_WAIT_S` without
one, the platform and the user are told it was not delivered (``message.undecryptable``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import jsontext
from .appservice import EVENT_MAX_DEPTH
from .db import Stores, now_ms
from .encryption import Encryption
from .matrix import MatrixHandler

log = logging.getLogger("dmbridge.late_keys")

# How long a message waits for its key before the user and the platform are told.
KEY_WAIT_S = 30.0
# Waiting messages tried in one go (the oldest first); more are tried at once after.
BATCH = 100
RETRY_AFTER_ERROR_S = 5.0


class LateKeys:
    def __init__(self, *, stores: Stores, encryption: Encryption, matrix: MatrixHandler) -> None:
        self.stores = stores
        self.encryption = encryption
        self.matrix = matrix
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Keys came, or a message started waiting: try again (in the background)."""
        self._wake.set()

    def start(self) -> None:
        """Messages left waiting by an earlier run are tried (or told) at once."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                wait = await self.try_again()
            except Exception:
                log.exception("messages waiting for their room key could not be tried again")
                wait = RETRY_AFTER_ERROR_S
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass

    async def try_again(self) -> float | None:
        """Decrypt the waiting messages that can be now, tell those that waited long enough.
        Returns the seconds until the next one's wait is over (None: none waits)."""
        await self.encryption.store_kept_keys()
        waiting = await self.stores.undecrypted.oldest(BATCH)
        now = now_ms()
        decrypted: list[tuple[str, Any]] = []
        expired: list[dict[str, Any]] = []
        next_s: float | None = None
        for item in waiting:
            event = item.event
            plain = await self.encryption.decrypt(event)
            if plain is not event:
                log.info("%s: %s decrypted once its room key came", event["room_id"],
                         event["event_id"])
                decrypted.append((str(event["event_id"]),
                                  jsontext.reread(plain, EVENT_MAX_DEPTH)[0]))
                continue
            left = item.received_at / 1000 + KEY_WAIT_S - now / 1000
            if left <= 0:
                expired.append(event)
            else:
                next_s = left if next_s is None else min(next_s, left)
        if decrypted or expired:
            await self.matrix.handle_late(decrypted, expired)
            if len(waiting) == BATCH:
                return 0.0  # more behind these
        if self.encryption.keys_kept:  # room keys the database could not take yet
            next_s = min(next_s or RETRY_AFTER_ERROR_S, RETRY_AFTER_ERROR_S)
        return next_s
