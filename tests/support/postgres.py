"""A private, throwaway PostgreSQL cluster for tests, built from the system's PostgreSQL binaries.

Durability is switched off (fsync, synchronous_commit, full_page_writes) because the data is
discarded after the test run anyway and it makes the cluster much faster.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import stat
import subprocess
from pathlib import Path

from dmbridge.localhs import free_port

__all__ = ["PostgresCluster", "find_pg_bin"]

log = logging.getLogger("dmbridge.tests.postgres")

_PG_ROOT = Path("/usr/lib/postgresql")
_TAIL_LINES = 40


def find_pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<N>/bin holding initdb and pg_ctl, or None."""
    if not _PG_ROOT.is_dir():
        return None
    candidates = []
    for entry in _PG_ROOT.iterdir():
        bindir = entry / "bin"
        if (
            re.fullmatch(r"\d+(\.\d+)?", entry.name)
            and (bindir / "initdb").is_file()
            and (bindir / "pg_ctl").is_file()
        ):
            candidates.append((tuple(int(p) for p in entry.name.split(".")), bindir))
    return max(candidates)[1] if candidates else None



def _tail(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-_TAIL_LINES:])


class PostgresCluster:
    """initdb + pg_ctl in ``workdir``; trust auth for user ``postgres`` on 127.0.0.1 only."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir).resolve()
        self.datadir = self.workdir / "data"
        self.logfile = self.workdir / "pg.log"
        self.port = free_port()
        self._running = False
        bindir = find_pg_bin()
        if bindir is None:
            raise RuntimeError(f"no PostgreSQL installation with initdb/pg_ctl under {_PG_ROOT}")
        self.bindir = bindir

    def _cmd(self, binary: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / binary), *args]
        # PostgreSQL refuses to run as root, so drop to the Debian "postgres" user.
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return cmd

    def _run(self, binary: str, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = self._cmd(binary, *args)
        proc = subprocess.run(
            cmd,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            out = "\n".join(proc.stdout.splitlines()[-_TAIL_LINES:])
            log_tail = _tail(self.logfile)
            raise RuntimeError(
                f"{' '.join(cmd)} exited with {proc.returncode}:\n{out}"
                + (f"\n--- {self.logfile} ---\n{log_tail}" if log_tail else "")
            )
        return proc

    def _hand_over_to_postgres_user(self) -> None:
        pg = pwd.getpwnam("postgres")
        for path in (self.workdir, *self.workdir.rglob("*")):
            os.chown(path, pg.pw_uid, pg.pw_gid)
        # The postgres user must be able to reach workdir; pytest's tmp dirs (and /root) are
        # 0700, so grant search-only (o+x, no listing) on ancestors that lack it.
        for parent in self.workdir.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                log.info(
                    "granting o+x on %s so the postgres user can reach %s", parent, self.workdir
                )
                parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)

    def start(self, timeout: float = 30.0) -> None:
        """initdb on first use, then start the server and wait until it accepts connections."""
        if self._running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._hand_over_to_postgres_user()
        if not (self.datadir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off "
            f"-c synchronous_commit=off -c full_page_writes=off "
            f"-c unix_socket_directories={self.workdir}"
        )
        # -w waits until the server accepts connections (or -t seconds pass).
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-o",
            options,
            "-w",
            "-t",
            str(int(max(timeout, 1))),
        )
        self._running = True
        log.info("PostgreSQL (%s) listening on 127.0.0.1:%d", self.bindir, self.port)

    def stop(self) -> None:
        """Fast shutdown (rolls back open transactions, disconnects clients). Idempotent."""
        if not self._running:
            return
        self._running = False
        self._run("pg_ctl", "stop", "-D", str(self.datadir), "-m", "fast", "-w")
        log.info("PostgreSQL on port %d stopped", self.port)

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return a postgres:// URL for it."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"
