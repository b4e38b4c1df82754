"""Fixtures shared by every test: typed settings for a bridge, and the database backends."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postgres import PostgresCluster, find_pg_bin

# CI sets this so a missing PostgreSQL fails the run instead of skipping its half.
REQUIRE_ALL = os.environ.get("DMBRIDGE_TEST_REQUIRE_ALL") == "1"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    if find_pg_bin() is None:
        if REQUIRE_ALL:
            pytest.fail("PostgreSQL is not installed (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed")
    # Outside pytest's temp tree: pytest resets its folders to 0700, which locks postgres out.
    folder = Path(tempfile.mkdtemp(prefix="dmbridge-pg-"))
    cluster = PostgresCluster(folder)
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dmbridge.db'}"
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    return cluster.create_database(f"t_{uuid.uuid4().hex[:12]}")
