"""What the benchmarks share: helper processes, and the database to run on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.postgres import PostgresCluster

DB_HELP = "sqlite, postgres (a private throwaway cluster), or a postgres:// URL"


def spawn(module: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m module``, which prints its URL first and serves until stdin closes.

    In its own process, its CPU is billed to neither side of a comparison.
    """
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


def database(choice: str, folder: Path) -> tuple[str, PostgresCluster | None]:
    """The database URL for ``--db`` (and the throwaway cluster to stop, if one was started)."""
    if choice == "sqlite":
        return f"sqlite:///{folder / 'bench.db'}", None
    if choice == "postgres":
        cluster = PostgresCluster(folder / "pg")
        cluster.start()
        return cluster.create_database("bench"), cluster
    return choice, None
