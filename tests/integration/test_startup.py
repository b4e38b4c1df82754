"""Start-up as an admin and systemd see it: a failure ends the process at once with one line
saying what, why and what to do; the files the bridge writes stay private and keep their owner.

Every command runs as a real process. Run as root, the bridge runs as the unprivileged user
65534 where permissions matter (root could write a read-only file anyway).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from dmbridge.localhs import free_port
from tests.support.postgres import PostgresCluster
from tests.support.process import LIVE_PATHS, BridgeProcess

# Generous: a failed start takes about a second (PostgreSQL: its retries, about 15 s). Only a
# hang (the bug: systemd never restarts a process that does not exit) goes past it.
EXIT_BOUND_S = 120
SERVICE_UID = 65534
AS_ROOT = os.geteuid() == 0


@pytest.fixture
def folder() -> Iterator[Path]:
    """Outside pytest's 0700 temp tree, so that the service user can reach it."""
    path = Path(tempfile.mkdtemp(prefix="dmbridge-startup-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def command(*args: str, as_service: bool = False) -> list[str]:
    """``python -m dmbridge ARGS``; as the service user when we are root and ``as_service``."""
    prefix: list[str] = []
    if as_service and AS_ROOT:
        setpriv = shutil.which("setpriv")  # util-linux
        if setpriv is None:
            pytest.skip("running as another user needs setpriv (util-linux)")
        prefix = [setpriv, f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}", "--clear-groups"]
    return [*prefix, sys.executable, "-m", "dmbridge", *args]


ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def dmbridge(*args: str, cwd: Path, as_service: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args, as_service=as_service), cwd=cwd, capture_output=True,
                          text=True, timeout=EXIT_BOUND_S, stdin=subprocess.DEVNULL, env=ENV)


def generate(folder: Path, database: str, port: int | None = None) -> Path:
    """config.yaml and registration.yaml in ``folder``; the homeserver is never reachable."""
    port = port or free_port()
    done = dmbridge("generate", "-c", "config.yaml", "-r", "registration.yaml",
                    "--homeserver", f"http://127.0.0.1:{free_port()}", "--port", str(port),
                    "--address", f"http://127.0.0.1:{port}", "--database", database, cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "config.yaml"


def give_to_service_user(*paths: Path) -> None:
    if AS_ROOT:
        for path in paths:
            os.chown(path, SERVICE_UID, SERVICE_UID)


def assert_failed_start(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit status 1, one error line holding every fragment, no traceback; returns the line."""
    assert done.returncode == 1, (done.returncode, done.stderr)
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    [line] = errors
    assert "could not start: " in line
    for fragment in fragments:
        assert fragment in line, line
    assert "Traceback" not in done.stderr, done.stderr
    assert "Event loop is closed" not in done.stderr, done.stderr
    return line


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- start-up failures -----------------------------------------------------------------------


def test_read_only_database_file(folder: Path) -> None:
    config = generate(folder, "sqlite:dmbridge.db")
    db = folder / "dmbridge.db"
    db.touch()
    if AS_ROOT:
        db.chmod(0o644)  # root's file: the service user may only read it
        give_to_service_user(config)
        folder.chmod(0o777)  # the folder is not the problem here
    else:
        db.chmod(0o444)
    done = dmbridge("run", "-c", str(config), cwd=folder, as_service=True)
    assert_failed_start(done, f"database {db}: dmbridge.db is read-only for ",
                        "make it readable and writable by that user")


def test_read_only_database_folder(folder: Path) -> None:
    data = folder / "data"
    data.mkdir()
    config = generate(folder, "sqlite:data/dmbridge.db")
    give_to_service_user(config)
    data.chmod(0o555)
    done = dmbridge("run", "-c", str(config), cwd=folder, as_service=True)
    assert_failed_start(done, f"database {data / 'dmbridge.db'}: the folder {data} is not "
                        "writable by ", "make the folder writable by that user")
    assert not (data / "dmbridge.db").exists()


def test_missing_database_folder(folder: Path) -> None:
    config = generate(folder, "sqlite:missing/dmbridge.db")
    done = dmbridge("run", "-c", str(config), cwd=folder)
    missing = folder / "missing"
    assert_failed_start(done, f"the folder {missing} does not exist; create it",
                        "or change database.url")
    assert not missing.exists()


def test_unreachable_postgresql(folder: Path) -> None:
    port = free_port()  # nothing listens there
    config = generate(folder, f"postgres://dmbridge:secret@127.0.0.1:{port}/dmbridge")
    done = dmbridge("run", "-c", str(config), cwd=folder)
    line = assert_failed_start(
        done, f"database postgres://dmbridge:***@127.0.0.1:{port}/dmbridge: cannot connect",
        "check that PostgreSQL runs and accepts connections there, or change database.url")
    assert "secret" not in done.stderr
    retries = [x for x in done.stderr.splitlines() if "trying again in" in x]
    assert retries and all(" WARNING " in x for x in retries), done.stderr
    assert "attempts in" in line


def test_postgresql_database_that_does_not_exist(folder: Path, pg_cluster: PostgresCluster
                                                  ) -> None:
    url = f"postgres://postgres@127.0.0.1:{pg_cluster.port}/never_created"
    config = generate(folder, url)
    done = dmbridge("run", "-c", str(config), cwd=folder)
    assert_failed_start(done, f"127.0.0.1:{pg_cluster.port}/never_created: ",
                        '"never_created" does not exist; create it (createdb')
    assert "trying again" not in done.stderr  # no point: it fails at once


def test_database_locked_by_another_process(folder: Path) -> None:
    config = generate(folder, "sqlite:dmbridge.db")
    with closing(sqlite3.connect(folder / "dmbridge.db", isolation_level=None)) as other:
        other.execute("PRAGMA journal_mode = WAL")
        other.execute("BEGIN IMMEDIATE")  # another program writing, and not letting go
        done = dmbridge("run", "-c", str(config), cwd=folder)
    assert_failed_start(done, "locked by another process for more than 5 s",
                        "is another dmbridge running on it?")


async def test_a_second_bridge_on_the_same_sqlite_database(folder: Path) -> None:
    """Refused before it touches the database, naming it, the running one and the fix; once
    the first is gone (even killed), a bridge starts there again."""
    config = generate(folder, "sqlite:dmbridge.db")
    port = int(YAML(typ="safe").load(config)["appservice"]["port"])
    async with BridgeProcess(config, folder / "first.log") as first, \
            BridgeProcess(config, folder / "after.log") as after:
        first.start()
        await first.wait_ready(port, paths=LIVE_PATHS)  # no homeserver here
        done = dmbridge("run", "-c", str(config), cwd=folder)
        assert_failed_start(
            done, f"database {folder / 'dmbridge.db'}: another dmbridge (pid {first.pid}) is "
            "already running on this SQLite database",
            "stop the other one, or move to PostgreSQL (database.url) to run several workers")
        assert "cannot listen" not in done.stderr
        assert await first.kill() == -9
        after.start()
        await after.wait_ready(port, paths=LIVE_PATHS)
        assert await after.terminate() == 0


def test_port_in_use(folder: Path, db_url: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = generate(folder, db_url, port)
        done = dmbridge("run", "-c", str(config), cwd=folder)
    assert_failed_start(done, f"cannot listen on 127.0.0.1:{port} (appservice.hostname, "
                        "appservice.port): another program already listens there",
                        "choose another appservice.port")


def test_unreadable_config(folder: Path) -> None:
    config = generate(folder, "sqlite:dmbridge.db")
    if not AS_ROOT:
        config.chmod(0)
    done = dmbridge("run", "-c", str(config), cwd=folder, as_service=True)  # root's 0600 file
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"dmbridge: config key '(file)': {config} cannot be read by ")
    assert "make it readable by that user" in done.stderr
    assert "Traceback" not in done.stderr


# --- private files that keep their owner ------------------------------------------------------


def test_generate_writes_owner_only_files_and_tightens_the_registration(folder: Path) -> None:
    config = generate(folder, "sqlite:dmbridge.db")
    registration = folder / "registration.yaml"
    assert (mode(config), mode(registration)) == (0o600, 0o600)

    # An older version left the registration (both tokens inside) readable by everyone.
    registration.chmod(0o644)
    give_to_service_user(config, registration)
    text, before = config.read_bytes(), config.stat()
    done = dmbridge("generate", "-c", "config.yaml", "-r", "registration.yaml", cwd=folder)
    assert done.returncode == 0, done.stderr

    assert mode(registration) == 0o600
    after = registration.stat()
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    # Nothing to change in the config: not rewritten at all.
    assert config.read_bytes() == text
    assert config.stat().st_mtime_ns == before.st_mtime_ns
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp files


@pytest.mark.parametrize("old_mode", [None, 0o644], ids=["new", "old-world-readable"])
async def test_database_files_are_owner_only_and_read_only_commands_write_nothing(
    folder: Path, old_mode: int | None
) -> None:
    config = generate(folder, "sqlite:dmbridge.db")
    db = folder / "dmbridge.db"
    if old_mode is not None:
        db.touch()
        db.chmod(old_mode)
    text, before = config.read_bytes(), config.stat()
    port = int(YAML(typ="safe").load(config)["appservice"]["port"])
    async with BridgeProcess(config, folder / "bridge.log") as bridge:
        bridge.start()
        await bridge.wait_ready(port, paths=LIVE_PATHS)  # no homeserver here
        files = [db, folder / "dmbridge.db-wal", folder / "dmbridge.db-shm"]
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}

        done = dmbridge("list-dms", "-c", str(config), cwd=folder)
        assert done.returncode == 0, done.stderr
        await bridge.terminate()
    assert config.read_bytes() == text
    assert config.stat().st_mtime_ns == before.st_mtime_ns
    assert mode(config) == 0o600
    assert mode(db) == 0o600


@pytest.mark.skipif(not AS_ROOT, reason="giving a file to another user needs root")
async def test_a_rewrite_keeps_the_owner_and_mode(folder: Path) -> None:
    config = generate(folder, "sqlite:dmbridge.db")
    text = config.read_text()
    start = text.index("# The HTTP API platforms call")
    config.write_text(text[:start] + text[text.index("\n\n", start) + 2:])  # as an old version
    os.chown(config, SERVICE_UID, SERVICE_UID)
    config.chmod(0o640)
    port = int(YAML(typ="safe").load(config)["appservice"]["port"])

    async with BridgeProcess(config, folder / "bridge.log") as bridge:  # runs as root
        bridge.start()
        await bridge.wait_ready(port, paths=LIVE_PATHS)  # no homeserver here
        await bridge.terminate()
    upgraded = config.stat()
    assert "max_body_bytes: 131072" in config.read_text()  # it was rewritten ...
    assert (upgraded.st_uid, upgraded.st_gid, mode(config)) == (SERVICE_UID, SERVICE_UID, 0o640)

    done = dmbridge("generate", "-c", "config.yaml", "-r", "registration.yaml", "--port",
                    str(free_port()), cwd=folder)
    assert done.returncode == 0, done.stderr
    regenerated = config.stat()
    assert regenerated.st_ino != upgraded.st_ino  # replaced by a rename ...
    assert (regenerated.st_uid, regenerated.st_gid, mode(config)) == (
        SERVICE_UID, SERVICE_UID, 0o640)  # ... as its owner had it


def test_a_config_the_service_user_cannot_rewrite_is_upgraded_in_memory(
    folder: Path
) -> None:
    """root owns the config and its folder; the bridge runs as the service user and starts."""
    data = folder / "data"
    data.mkdir()
    config = generate(folder, "sqlite:data/dmbridge.db")
    text = config.read_text()
    start = text.index("# The HTTP API platforms call")
    config.write_text(text[:start] + text[text.index("\n\n", start) + 2:])  # an older version's
    old = config.read_bytes()
    give_to_service_user(data)
    config.chmod(0o644 if AS_ROOT else 0o444)
    if not AS_ROOT:
        folder.chmod(0o555)
    port = int(YAML(typ="safe").load(config)["appservice"]["port"])
    log_path = data / "bridge.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command("run", "-c", str(config), as_service=True), cwd=folder,
                                env=ENV, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_healthy(proc, port, log_path)
        finally:
            proc.terminate()
            assert proc.wait(EXIT_BOUND_S) == 0, log_path.read_text()
            folder.chmod(0o755)
    assert config.read_bytes() == old
    output = log_path.read_text()
    assert f"{config}: not upgraded in place (Permission denied); the upgraded settings are " \
           "used, the file is left as it was" in output, output


def wait_healthy(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    url = f"http://127.0.0.1:{port}/_dmbridge/v1/health"
    for _ in range(EXIT_BOUND_S * 10):  # bounded: about EXIT_BOUND_S
        assert proc.poll() is None, log_path.read_text()
        with contextlib.suppress(OSError):  # refused, reset, or an HTTP error status
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise AssertionError(f"not healthy:\n{log_path.read_text()}")


def test_sigterm_while_the_first_homeserver_check_hangs_stops_cleanly(folder: Path) -> None:
    """A homeserver that accepts connections and never answers holds the first check; SIGTERM
    then stops the bridge in order, with status 0, instead of killing it."""
    config = generate(folder, "sqlite:dmbridge.db")
    port = int(YAML(typ="safe").load(config)["appservice"]["port"])
    with closing(socket.socket()) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = {**ENV, "DMBRIDGE_HOMESERVER__ADDRESS":
               f"http://127.0.0.1:{silent.getsockname()[1]}"}
        log_path = folder / "bridge.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(command("run", "-c", str(config)), cwd=folder, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
            try:
                wait_healthy(proc, port, log_path)  # listening; the check still waits
            finally:
                proc.terminate()
            assert proc.wait(EXIT_BOUND_S) == 0, log_path.read_text()
    text = log_path.read_text()
    assert "stopped while starting" in text and "Traceback" not in text, text
