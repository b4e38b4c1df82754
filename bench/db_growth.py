"""Database bytes per exchange (a platform's message and the Matrix user's reply to it).

Each exchange goes through the bridge's own code paths against the stub homeserver: the
platform's message through ``DMService.send``, the reply as a homeserver transaction (a reply
to that message), its delivery by pull and acknowledgement over the HTTP API. Three figures per
database:

- without pruning: bytes added per exchange, everything kept (message maps both ways, the
  delivered outbox item, the processed event ID). The database grows by this for ever.
- with pruning: one retention round then prunes all of those exchanges (as it does once they
  are older than every limit) and as many exchanges again are made. The bytes this second
  window adds beyond the size the first one had reached, per exchange: near zero when the
  space of pruned rows is reused (SQLite's free pages; PostgreSQL's after VACUUM, which
  autovacuum runs). With pruning the database levels off at about the first figure times the
  exchanges of one retention window.

SQLite counts its file (after a WAL checkpoint); PostgreSQL the sum of
``pg_total_relation_size`` over the bridge's tables, after a VACUUM.

    python -m bench.db_growth [--exchanges 2000] [--dms 10] [--db sqlite postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from mautrix.util.async_db import Scheme

from bench.support import DB_HELP, bridge_on_stub
from dmbridge.bridge import Bridge
from dmbridge.db import now_ms
from dmbridge.retention import DAY_MS
from tests.support.settings import HS_TOKEN, SMS_TOKEN

ALICE = "@alice:localhost"


async def _size(bridge: Bridge) -> int:
    """Bytes the bridge's database takes on disk."""
    db = bridge.db
    if db.scheme == Scheme.SQLITE:
        await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        path = Path(bridge.settings.database_url.removeprefix("sqlite://"))
        return (await asyncio.to_thread(path.stat)).st_size
    await db.execute("VACUUM")  # as autovacuum does sooner or later: dead row versions freed
    return int(await db.fetchval(
        "SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind = 'r'"))


class Exchanges:
    """A platform and a Matrix user trading messages and replies through one bridge."""

    def __init__(self, bridge: Bridge, port: int, session: aiohttp.ClientSession,
                 rooms: dict[str, str]) -> None:
        self.bridge = bridge
        self.base = f"http://127.0.0.1:{port}"
        self.session = session
        self.rooms = rooms  # phone number -> room
        self.txn = iter(range(10**9))
        self.after = 0

    async def transaction(self, events: list[dict[str, Any]]) -> None:
        async with self.session.put(
                f"{self.base}/_matrix/app/v1/transactions/{next(self.txn)}",
                json={"events": events}, headers={"Authorization": f"Bearer {HS_TOKEN}"}) as resp:
            assert resp.status == 200, await resp.text()

    async def run(self, count: int) -> None:
        phones = list(self.rooms)
        for n in range(count):
            phone = phones[n % len(phones)]
            sent = await self.bridge.dms.send("sms", phone, ALICE, message_id=uuid.uuid4().hex,
                                              text=f"Your parcel {n} has arrived.")
            await self.transaction([{
                "type": "m.room.message", "event_id": f"${uuid.uuid4().hex}",
                "room_id": sent.room_id, "sender": ALICE,
                "origin_server_ts": int(time.time() * 1000),
                "content": {"msgtype": "m.text", "body": f"Thanks, I'll pick parcel {n} up.",
                            "m.relates_to": {"m.in_reply_to": {"event_id": sent.event_id}}},
            }])
            if n % 100 == 99 or n == count - 1:
                await self.pull()

    async def pull(self) -> None:
        """The platform takes every reply and acknowledges it."""
        headers = {"Authorization": f"Bearer {SMS_TOKEN}"}
        path = f"{self.base}/_dmbridge/v1/networks/sms/events"
        while True:
            async with self.session.get(path, headers=headers, params={
                    "after": str(self.after), "wait": "0", "limit": "1000"}) as resp:
                body = await resp.json()
            if not body["events"]:
                return
            self.after = body["next_after"]
            async with self.session.post(path + "/ack", headers=headers,
                                         json={"ids": [e["id"] for e in body["events"]]}) as resp:
                assert resp.status == 200, await resp.text()


async def measure(db: str, exchanges: int, dms: int) -> tuple[float, float]:
    """Bytes per exchange: without pruning, and with (beyond one window's size)."""
    async with bridge_on_stub(db, ping=False, quiet=logging.WARNING) as (bridge, _, port):
        await bridge.retention.stop()  # rounds are run here, when the figures want them
        async with aiohttp.ClientSession() as session:
            rooms: dict[str, str] = {}
            for i in range(dms):
                phone = f"+1555000{i:04d}"
                sent = await bridge.dms.send("sms", phone, ALICE, message_id="hello", text="hi")
                rooms[phone] = sent.room_id
            talk = Exchanges(bridge, port, session, rooms)
            await talk.transaction([{
                "type": "m.room.member", "event_id": f"$join-{i}", "room_id": room,
                "sender": ALICE, "state_key": ALICE,
                "content": {"membership": "join", "displayname": "Alice"},
            } for i, room in enumerate(rooms.values())])
            await talk.pull()
            base = await _size(bridge)
            await talk.run(exchanges)
            window = await _size(bridge)
            counts = await bridge.retention.prune(now_ms() + 400 * DAY_MS)
            assert counts is not None
            if bridge.db.scheme != Scheme.SQLITE:
                await bridge.db.execute("VACUUM")  # a second pass recycles emptied index pages
            await talk.run(exchanges)
            again = await _size(bridge)
            return (window - base) / exchanges, (again - window) / exchanges


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=2000)
    parser.add_argument("--dms", type=int, default=10)
    parser.add_argument("--db", nargs="+", default=["sqlite", "postgres"], help=DB_HELP)
    args = parser.parse_args()
    print(f"database growth, {args.exchanges} exchanges (a message in, a reply out) over"
          f" {args.dms} DMs")
    print(f"{'database':>10}  {'without pruning B/exchange':>26}  {'with pruning B/exchange':>23}")
    for db in args.db:
        grown, again = await measure(db, args.exchanges, args.dms)
        print(f"{db:>10}  {grown:>26.0f}  {again:>23.0f}")


if __name__ == "__main__":
    asyncio.run(main())
