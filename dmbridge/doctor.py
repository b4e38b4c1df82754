"""``dmbridge doctor``: every check of the set-up, one line each, ``ok``, ``problem`` or ``skip``.

The homeserver checks are the ones the bridge runs at start (:mod:`dmbridge.diagnosis`), so
the doctor and the bridge's log say the same. Nothing is written: not the config, not the
database (its schema version is read, not upgraded), not the homeserver (the namespace checks
ask about ghosts without creating them).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
from ruamel.yaml import YAML
from yarl import URL

from .config import ConfigError, Settings, open_config
from .db import safe_url, upgrade_table
from .db.connect import PG_CONNECT_TIMEOUT_S, is_sqlite, postgres_failure, sqlite_companions
from .diagnosis import REGENERATE, HomeserverChecks, Problem, Versions
from .startup import current_user

WEBHOOK_TIMEOUT = aiohttp.ClientTimeout(total=10)
BRIDGE_TIMEOUT = aiohttp.ClientTimeout(total=3)


@dataclass(frozen=True)
class Finding:
    status: str  # ok, problem or skip
    check: str
    text: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status} {self.check}: {self.text}" + (f" fix: {self.fix}" if self.fix
                                                             else "")


def ok(check: str, text: str) -> Finding:
    return Finding("ok", check, text)


def problem(p: Problem) -> Finding:
    return Finding("problem", p.check, p.cause, p.fix)


class Doctor:
    def __init__(self, config_path: Path, registration_path: Path | None) -> None:
        self.config_path = config_path
        self.registration_given = registration_path is not None
        self.registration_path = registration_path or config_path.parent / "registration.yaml"
        self.findings: list[Finding] = []
        self.settings: Settings | None = None
        self.registration: dict[str, Any] | None = None

    def report(self, finding: Finding) -> None:
        self.findings.append(finding)
        print(finding.line(), flush=True)

    async def guarded(self, check: str, run: Callable[[], Awaitable[None]]) -> None:
        """A check that fails unexpectedly is a problem line, never a traceback."""
        try:
            await run()
        except Exception as e:
            self.report(Finding("problem", check, f"the check failed: {e!r}",
                                "run it again; if it persists, report it with this line"))

    async def run(self) -> int:
        await self.guarded("config", self.config)
        if self.settings is not None:
            await self.guarded("files", self.files)
            await self.guarded("registration file", self.registration_file)
            await self.guarded("database", self.database)
            async with aiohttp.ClientSession() as session:
                await self.guarded("homeserver", lambda: self.homeserver(session))
                await self.guarded("webhooks", lambda: self.webhooks(session))
        return 1 if any(f.status == "problem" for f in self.findings) else 0

    # --- the config and the files ------------------------------------------------------------

    async def config(self) -> None:
        try:
            self.settings = open_config(self.config_path)
        except ConfigError as e:
            self.report(Finding("problem", "config", str(e),
                                f"correct it in {self.config_path}"))
            return
        self.report(ok("config", f"{self.config_path} is valid"))

    async def files(self) -> None:
        self.private_file("config file", self.config_path)
        if self.registration_path.exists():
            self.private_file("registration file", self.registration_path)
        assert self.settings is not None
        url = self.settings.database_url
        if is_sqlite(url):
            path = Path(URL(url).path)
            for file in (path, *sqlite_companions(path)):
                if file.exists():
                    self.private_file("database file", file)

    def private_file(self, check: str, path: Path) -> None:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            self.report(Finding(
                "problem", check, f"{path} has mode {mode:04o}: others may read it, and it "
                "holds the bridge's secrets or messages", f"chmod 600 {path}"))
            return
        if not os.access(path, os.R_OK):
            self.report(Finding("problem", check, f"{path} cannot be read by {current_user()}",
                                "give it to the user the bridge runs as (chown)"))
            return
        self.report(ok(check, f"{path} is readable by its owner only (mode {mode:04o})"))

    async def registration_file(self) -> None:
        assert self.settings is not None
        path = self.registration_path
        if not path.exists():
            if self.registration_given:
                self.report(Finding("problem", "registration file", f"{path} does not exist",
                                    "run `dmbridge generate` to write it, or pass its path"))
            else:
                self.report(Finding("skip", "registration file", f"no {path.name} beside the "
                                    "config; pass -r PATH to compare it with the config"))
            return
        try:
            data = YAML(typ="safe").load(path)
        except Exception as e:
            self.report(Finding("problem", "registration file", f"{path} cannot be read: {e}",
                                REGENERATE))
            return
        self.registration = data if isinstance(data, dict) else {}
        expected = self.settings.registration()
        differ = [key for key in ("id", "url", "as_token", "hs_token", "sender_localpart")
                  if self.registration.get(key) != expected[key]]
        loaded = _user_regexes(self.registration)
        missing = [n.id for n in self.settings.networks if n.namespace_regex() not in loaded]
        if missing:
            differ.append("the namespaces of network(s) " + ", ".join(missing))
        if differ:
            self.report(Finding("problem", "registration file",
                                f"{path} differs from the config in: {', '.join(differ)}",
                                REGENERATE))
            return
        self.report(ok("registration file", f"{path} matches the config"))

    # --- the database ------------------------------------------------------------------------

    async def database(self) -> None:
        assert self.settings is not None
        url = self.settings.database_url
        latest = len(upgrade_table.upgrades)
        if is_sqlite(url):
            path = Path(URL(url).path)
            if not path.exists():  # noqa: ASYNC240 (a stat, once)
                folder = path.parent
                if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
                    self.report(Finding("problem", "database", f"{path} does not exist and its "
                                        f"folder {folder} is not writable by {current_user()}",
                                        "create the folder, writable by the bridge's user, or "
                                        "change database.url"))
                else:
                    self.report(ok("database", f"{path} does not exist yet; `dmbridge run` "
                                   f"creates it (schema version {latest})"))
                return
            if not os.access(path, os.R_OK):
                self.report(Finding("problem", "database", f"{path} cannot be read by "
                                    f"{current_user()}", "run the doctor as the user the bridge "
                                    "runs as, or give the file to that user (chown)"))
                return
            try:
                version = _sqlite_version(path)
            except sqlite3.Error as e:
                self.report(Finding("problem", "database", f"{path}: SQLite cannot read it: "
                                    f"{e}", "restore it from a backup, or change database.url"))
                return
        else:
            try:
                conn = await asyncpg.connect(url, timeout=PG_CONNECT_TIMEOUT_S)
            except Exception as e:
                problem_text, _, fix = postgres_failure(url, e).partition("; ")
                self.report(Finding("problem", "database", problem_text,
                                    fix or "check database.url"))
                return
            try:
                exists = await conn.fetchval("SELECT to_regclass('version') IS NOT NULL")
                version = await conn.fetchval("SELECT version FROM version LIMIT 1") \
                    if exists else 0
            finally:
                await conn.close()
        self.report(self.schema(safe_url(url), int(version or 0), latest))

    @staticmethod
    def schema(where: str, version: int, latest: int) -> Finding:
        if version > latest:
            return Finding("problem", "database", f"{where} has schema version {version}, "
                           f"newer than this dmbridge knows ({latest})",
                           "run the dmbridge version that wrote it, or restore a backup")
        if version < latest:
            return ok("database", f"{where} answers, schema version {version}; `dmbridge run` "
                      f"upgrades it to {latest}")
        return ok("database", f"{where} answers, schema version {version} (current)")

    # --- the homeserver ----------------------------------------------------------------------

    async def homeserver(self, session: aiohttp.ClientSession) -> None:
        assert self.settings is not None
        settings = self.settings
        registered = self.registration.get("as_token") if self.registration else None
        checks = HomeserverChecks(settings, session, registration_as_token=(
            str(registered) if registered is not None else None))
        versions = await checks.versions()
        if isinstance(versions, Problem):
            self.report(problem(versions))
            return self.skip_after("homeserver")
        self.report(ok("homeserver", _describe(checks.url, versions)))
        if (who := await checks.whoami()) is not None:
            self.report(problem(who))
            return self.skip_after("registration")
        self.report(ok("registration", f"the homeserver accepts the as_token; the bot is "
                       f"{settings.bot_user_id}"))
        for network in settings.networks:
            if (p := await checks.namespace(network)) is not None:
                self.report(problem(p))
            else:
                self.report(ok(f"network {network.id}", "its ghosts are in the namespaces of "
                               "the registration the homeserver loaded"))
        bridge = await self.bridge_running(session)
        if bridge is not None:
            self.report(Finding("skip", "ping", f"the bridge is not running at {bridge}, so the "
                                "homeserver cannot call it; start it (`dmbridge run`) and run "
                                "doctor again to check that the homeserver reaches it"))
            return
        ping = await checks.ping()
        if isinstance(ping, Problem):
            self.report(problem(ping))
        elif ping is None:
            self.report(Finding("skip", "ping", "the homeserver does not offer the appservice "
                                "ping (Matrix v1.7), so whether it reaches the bridge is not "
                                "checked"))
        else:
            self.report(ok("ping", f"the homeserver reaches the bridge at "
                           f"{settings.appservice_address} ({ping} ms)"))

    def skip_after(self, failed: str) -> None:
        self.report(Finding("skip", "ping", f"not tried: the {failed} check failed"))

    async def bridge_running(self, session: aiohttp.ClientSession) -> str | None:
        """None if the bridge answers on its listener, else its URL."""
        assert self.settings is not None
        host = self.settings.hostname
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{host}:{self.settings.port}"
        try:
            async with session.get(url + "/_dmbridge/v1/health/live", timeout=BRIDGE_TIMEOUT):
                return None  # any answer: something listens there
        except (aiohttp.ClientError, TimeoutError):
            return url

    # --- the webhooks ------------------------------------------------------------------------

    async def webhooks(self, session: aiohttp.ClientSession) -> None:
        assert self.settings is not None
        for i, network in enumerate(self.settings.networks):
            url = network.delivery.url
            if network.delivery.mode != "webhook" or url is None:
                continue
            check = f"webhook {network.id}"
            try:  # unsigned: any HTTP answer shows a receiver is there
                async with session.head(url, timeout=WEBHOOK_TIMEOUT) as resp:
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as e:
                reason = f"no answer within {WEBHOOK_TIMEOUT.total:g} s" \
                    if isinstance(e, TimeoutError) else str(e) or type(e).__name__
                self.report(Finding("problem", check, f"{url} (networks[{i}].delivery.url) is "
                                    f"unreachable: {reason}", "start the platform's receiver, "
                                    f"or correct networks[{i}].delivery.url"))
                continue
            self.report(ok(check, f"{url} answers (HTTP {status} to an unsigned HEAD)"))


def _user_regexes(registration: dict[str, Any]) -> set[str]:
    namespaces = registration.get("namespaces")
    users = namespaces.get("users") if isinstance(namespaces, dict) else None
    if not isinstance(users, list):
        return set()
    return {str(u.get("regex")) for u in users if isinstance(u, dict)}


def _sqlite_version(path: Path) -> int:
    # Read-only: the doctor never creates or upgrades anything.
    uri = "file:///" + quote(str(path).lstrip("/")) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=5)
    try:
        row = conn.execute("SELECT name FROM sqlite_master WHERE name = 'version'").fetchone()
        if row is None:
            return 0
        found = conn.execute("SELECT version FROM version LIMIT 1").fetchone()
        return int(found[0]) if found else 0
    finally:
        conn.close()


def _describe(url: str, versions: Versions) -> str:
    spec = versions.versions
    span = f"Matrix {spec[0]} to {spec[-1]}" if len(spec) > 1 else f"Matrix {spec[0]}" \
        if spec else "no Matrix versions"
    server = f"{versions.server}, " if versions.server else ""
    return f"{url} (homeserver.address) answers: {server}{span}"


async def run_doctor(config_path: Path, registration_path: Path | None) -> int:
    return await Doctor(config_path, registration_path).run()
