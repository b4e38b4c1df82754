"""SQLite is opened with a page cache and memory-mapped reads sized for a big database."""

from __future__ import annotations

import logging
from pathlib import Path

from dmbridge.db import create_database, start_database


async def test_sqlite_opens_with_a_large_page_cache_and_memory_mapped_reads(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dmbridge.db'}"
    db = create_database(url, db_args={}, log=logging.getLogger("dmbridge.db"))
    await start_database(db, url)
    try:
        assert await db.fetchval("PRAGMA cache_size") == -65536  # KiB: 64 MiB
        assert await db.fetchval("PRAGMA mmap_size") == 256 * 1024 * 1024
        assert await db.fetchval("PRAGMA journal_mode") == "wal"  # mautrix's own, kept
    finally:
        await db.stop()
