"""A throwaway local Synapse homeserver for the quick-start demo and the integration tests.

Synapse is installed on first use into its own venv under the cache directory (it has heavy,
pinned dependencies that must not leak into dmbridge's environment) and run as a plain
subprocess bound to 127.0.0.1 with SQLite, no federation and (unless a test asks for them)
effectively no rate limits.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["SYNAPSE_VERSION", "LocalSynapse", "cache_dir", "ensure_synapse", "free_port"]

SYNAPSE_VERSION = "1.163.2"

log = logging.getLogger("dmbridge.localhs")

# Ignore any *_proxy environment variables: everything we talk to is on 127.0.0.1.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_INSTALLED_MARKER = ".dmbridge-installed"
_TAIL_LINES = 40
_TAIL_CHARS = 4000  # pip's "from versions: ..." line alone can be several kB

# Every client-facing rate limiter Synapse 1.163 knows, raised so tests are never throttled.
_UNLIMITED = {"per_second": 1000, "burst_count": 1000}
_RATE_LIMITS: dict[str, Any] = {
    "rc_message": _UNLIMITED,
    "rc_registration": _UNLIMITED,
    "rc_registration_token_validity": _UNLIMITED,
    "rc_login": {
        "address": _UNLIMITED,
        "account": _UNLIMITED,
        "failed_attempts": _UNLIMITED,
    },
    "rc_admin_redaction": _UNLIMITED,
    "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
    "rc_joins_per_room": _UNLIMITED,
    "rc_3pid_validation": _UNLIMITED,
    "rc_invites": {
        "per_room": _UNLIMITED,
        "per_user": _UNLIMITED,
        "per_issuer": _UNLIMITED,
    },
    "rc_third_party_invite": _UNLIMITED,
    "rc_room_creation": _UNLIMITED,
    "rc_presence": {"per_user": _UNLIMITED},
    "rc_delayed_event_mgmt": _UNLIMITED,
    "rc_reports": _UNLIMITED,
    "rc_media_create": _UNLIMITED,
    "rc_user_directory": _UNLIMITED,
    "rc_profile": _UNLIMITED,
}


def cache_dir() -> Path:
    """Where downloaded tooling lives: $DMBRIDGE_CACHE, else ~/.cache/dmbridge."""
    env = os.environ.get("DMBRIDGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dmbridge"


def _tail_text(text: str) -> str:
    return "\n".join(text.splitlines()[-_TAIL_LINES:])[-_TAIL_CHARS:]


def _tail(path: Path) -> str:
    try:
        return _tail_text(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return ""


def ensure_synapse(cache: Path | None = None) -> Path:
    """Return the python executable of a venv holding matrix-synapse==SYNAPSE_VERSION.

    Installs it on first use. A file lock serialises concurrent callers (e.g. parallel test
    workers) and a marker written only after pip succeeds makes an interrupted install redo.
    """
    cache = cache if cache is not None else cache_dir()
    venv = cache / f"synapse-{SYNAPSE_VERSION}"
    python = venv / "bin" / "python"
    marker = venv / _INSTALLED_MARKER
    if marker.exists() and python.exists():
        return python

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"synapse-{SYNAPSE_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Another process may have finished the install while we waited for the lock.
        if marker.exists() and python.exists():
            return python
        if venv.exists():
            log.info("removing incomplete Synapse install at %s", venv)
            shutil.rmtree(venv)
        log.info("installing Synapse %s into %s (up to a minute, only once)", SYNAPSE_VERSION, venv)
        started = time.monotonic()
        _run_install([sys.executable, "-m", "venv", str(venv)])
        _run_install(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                f"matrix-synapse=={SYNAPSE_VERSION}",
            ]
        )
        marker.write_text(f"{SYNAPSE_VERSION}\n", encoding="utf-8")
        log.info("Synapse %s installed in %.0f s", SYNAPSE_VERSION, time.monotonic() - started)
    return python


def _run_install(cmd: list[str]) -> None:
    proc = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = _tail_text(proc.stdout)
        raise RuntimeError(
            f"installing Synapse {SYNAPSE_VERSION} failed: {' '.join(cmd)} exited with "
            f"{proc.returncode}:\n{tail}"
        )


def free_port(preferred: int = 0) -> int:
    """A port on 127.0.0.1 that is free now: ``preferred`` if it is, else any.

    Racy in theory (the port is released before the caller binds it), fine for local use.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalSynapse:
    """A single Synapse process bound to 127.0.0.1, with all state kept in ``workdir``.

    Stopping and starting again with the same workdir keeps users, rooms and keys; the config
    is rewritten on every start so new appservice registrations or a new port take effect.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        server_name: str = "localhost",
        port: int = 0,
        registration_files: Sequence[Path] = (),
        python: Path | None = None,
        rate_limits: Mapping[str, Any] | None = None,
    ) -> None:
        """``rate_limits`` replaces some of the raised ``rc_*`` settings, e.g.
        ``{"rc_message": {"per_second": 1, "burst_count": 3}}``, to test behaviour under them."""
        self.workdir = Path(workdir).resolve()
        self.rate_limits = {**_RATE_LIMITS, **(rate_limits or {})}
        self.server_name = server_name
        # Chosen now so base_url is known (e.g. for the bridge config) before start().
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.registration_files = [Path(p).resolve() for p in registration_files]
        self._python = python
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout: IO[bytes] | None = None

        self.workdir.mkdir(parents=True, exist_ok=True)
        self._secrets = self._load_secrets()
        self.shared_secret: str = self._secrets["registration_shared_secret"]

    @property
    def pid(self) -> int | None:
        """PID of the running Synapse, None when not started or stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def stdout_log(self) -> Path:
        return self.workdir / "homeserver.stdout.log"

    @property
    def log_file(self) -> Path:
        return self.workdir / "homeserver.log"

    def _load_secrets(self) -> dict[str, str]:
        # Persisted so a restart keeps issued access tokens (macaroons) and the shared secret valid.
        path = self.workdir / "secrets.json"
        names = ("registration_shared_secret", "macaroon_secret_key", "form_secret")
        data: dict[str, str] = {}
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
        if any(name not in data for name in names):
            for name in names:
                data.setdefault(name, secrets.token_urlsafe(32))
            path.write_text(json.dumps(data, indent=2), encoding="utf-8")
            path.chmod(0o600)
        return data

    def _write_config(self) -> Path:
        wd = self.workdir
        log_config = {
            "version": 1,
            "formatters": {
                "precise": {
                    "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                    "%(request)s - %(message)s"
                }
            },
            # Unbuffered file handler so the log tail is complete when start() fails.
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_file),
                    "encoding": "utf8",
                }
            },
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }
        (wd / "log.config").write_text(json.dumps(log_config, indent=2), encoding="utf-8")

        config: dict[str, Any] = {
            "server_name": self.server_name,
            "pid_file": str(wd / "homeserver.pid"),
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {"name": "sqlite3", "args": {"database": str(wd / "homeserver.db")}},
            "log_config": str(wd / "log.config"),
            "media_store_path": str(wd / "media_store"),
            "signing_key_path": str(wd / "signing.key"),
            "enable_registration": False,
            "registration_shared_secret": self._secrets["registration_shared_secret"],
            "macaroon_secret_key": self._secrets["macaroon_secret_key"],
            "form_secret": self._secrets["form_secret"],
            "report_stats": False,
            # Fully offline: no federation, no remote key servers.
            "trusted_key_servers": [],
            "federation_domain_whitelist": [],
            "suppress_key_server_warning": True,
            "app_service_config_files": [str(p) for p in self.registration_files],
            "presence": {"enabled": False},
            "url_preview_enabled": False,
            "max_upload_size": "50M",
            # What an appservice needs to encrypt as its ghosts: to-device events, one-time key
            # counts and device list changes in its transactions (README: "Encrypted DMs").
            "experimental_features": {
                "msc2409_to_device_messages_enabled": True,
                "msc3202_transaction_extensions": True,
            },
            **self.rate_limits,
        }
        path = wd / "homeserver.yaml"
        # JSON is valid YAML and needs no extra dependency.
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return path

    def start(self, timeout: float = 60.0) -> None:
        """Write the config, start Synapse and wait until the client API answers."""
        if self._proc is not None and self._proc.poll() is None:
            return
        python = self._python or ensure_synapse()
        config = self._write_config()
        started = time.monotonic()
        if not (self.workdir / "signing.key").exists():
            proc = subprocess.run(
                [
                    str(python),
                    "-m",
                    "synapse.app.homeserver",
                    "--config-path",
                    str(config),
                    "--generate-keys",
                ],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                tail = _tail_text(proc.stdout)
                raise RuntimeError(f"Synapse key generation failed:\n{tail}")

        self._stdout = open(self.stdout_log, "ab")  # closed in stop()
        self._proc = subprocess.Popen(
            [str(python), "-m", "synapse.app.homeserver", "-c", str(config)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=subprocess.STDOUT,
        )
        log.info("starting Synapse (pid %d) at %s", self._proc.pid, self.base_url)
        try:
            self._wait_ready(started + timeout)
        except BaseException:
            self.stop(timeout=5.0)
            raise
        log.info("Synapse ready at %s after %.1f s", self.base_url, time.monotonic() - started)

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        url = f"{self.base_url}/_matrix/client/versions"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"Synapse exited with code {code} during startup:\n" + self._log_tails()
                )
            try:
                with _opener.open(url, timeout=2.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Synapse did not answer on {url} in time:\n" + self._log_tails()
                )
            time.sleep(0.2)

    def _log_tails(self) -> str:
        parts = []
        for path in (self.stdout_log, self.log_file):
            tail = _tail(path)
            if tail:
                parts.append(f"--- {path} ---\n{tail}")
        return "\n".join(parts) or "(no log output)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM Synapse, SIGKILL it if it has not exited after ``timeout``. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("Synapse (pid %d) ignored SIGTERM, killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.info("Synapse (pid %d) stopped", proc.pid)
        if self._stdout is not None:
            self._stdout.close()
            self._stdout = None

    def __enter__(self) -> LocalSynapse:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.base_url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with _opener.open(req, timeout=30.0) as resp:
            return json.load(resp)

    def register_user(self, localpart: str, password: str, *, admin: bool = False) -> str:
        """Create a user via the shared-secret admin API and return its full user ID.

        An already existing user is not an error, so callers can register unconditionally.
        """
        path = "/_synapse/admin/v1/register"
        nonce: str = self._request("GET", path)["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        for part in (nonce, localpart, password):
            mac.update(part.encode())
            mac.update(b"\x00")
        mac.update(b"admin" if admin else b"notadmin")
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        try:
            user_id: str = self._request("POST", path, body)["user_id"]
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            if err.code == 400 and "M_USER_IN_USE" in detail:
                return f"@{localpart}:{self.server_name}"
            raise RuntimeError(
                f"registering {localpart!r} failed: HTTP {err.code} {detail}"
            ) from err
        log.info("registered %s", user_id)
        return user_id
