"""What is wrong between the bridge and its homeserver, each told as a cause and a fix.

The bridge's start-up and readiness checks and ``dmbridge doctor`` ask the same questions
through :class:`HomeserverChecks`, so an admin reads the same sentence in the log and in the
doctor's output. The classic set-up mistakes each have their own answer:

- the homeserver is down or ``homeserver.address`` is wrong: no answer at all;
- the registration is not loaded (the homeserver was not restarted after ``dmbridge
  generate``) or ``appservice.as_token`` differs from it: the as_token is unknown (401);
- ``appservice.hs_token`` differs from the registration: the homeserver's call to the
  bridge is refused by the bridge (the ping comes back ``M_BAD_STATUS`` 403);
- ``homeserver.domain`` is wrong: the homeserver names the bot on another domain;
- a network was added without regenerating the registration and restarting the homeserver:
  that network's ghosts are outside the namespaces the homeserver loaded.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from .config import Settings
from .networks import Network

CHECK_TIMEOUT = aiohttp.ClientTimeout(total=10)
# The homeserver calls the bridge within the ping; give that call its own time.
PING_TIMEOUT = aiohttp.ClientTimeout(total=20)
PROBE_LOCALPART = "namespace-check"

REGENERATE = ("run `dmbridge generate` again (it rewrites the registration from the config), "
              "then restart the homeserver: it reads registrations only at start")


@dataclass(frozen=True)
class Problem:
    """One failing check: ``cause`` says what is wrong, ``fix`` what to do about it.

    A ``fatal`` problem can only be fixed in the bridge's own config: the bridge stops.
    The others are fixed on the homeserver's side (or go away by themselves): the bridge keeps
    running, not ready, and checks again.
    """

    check: str
    cause: str
    fix: str
    fatal: bool = False

    def __str__(self) -> str:
        return f"{self.cause}; {self.fix}"

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "error": self.cause, "fix": self.fix}


@dataclass(frozen=True)
class Unreachable(Problem):
    """The homeserver does not answer (yet): waited for, never fatal."""

    reason: str = ""


@dataclass(frozen=True)
class Versions:
    """What the homeserver says about itself."""

    versions: list[str]
    server: str | None


def wrong_hs_token(path: str) -> str:
    """The log line for a call to the bridge's appservice endpoints with a wrong hs_token."""
    return (f"refused {path}: its hs_token is not appservice.hs_token. If the homeserver sent "
            f"it, the registration it loaded has another hs_token; {REGENERATE}")


def unknown_as_token(detail: str, registration_as_token: str | None = None,
                     as_token: str | None = None) -> Problem:
    """The homeserver answers the as_token 401. Told apart when the registration file is at
    hand (``dmbridge doctor``): its as_token differs from the config's, or it is not loaded."""
    if registration_as_token is not None and registration_as_token != as_token:
        return Problem(
            "registration",
            f"the homeserver does not know the bridge's as_token ({detail}): "
            "appservice.as_token differs from the as_token in the registration file",
            REGENERATE,
        )
    not_loaded = ("the homeserver has not loaded the registration (it was not restarted after "
                  "`dmbridge generate`, or the file is not in its app_service_config_files)")
    if registration_as_token is not None:
        return Problem(
            "registration",
            f"the homeserver does not know the bridge's as_token ({detail}): {not_loaded}",
            "add the registration file to the homeserver's app_service_config_files and "
            "restart the homeserver: it reads registrations only at start",
        )
    return Problem(
        "registration",
        f"the homeserver does not know the bridge's as_token ({detail}): {not_loaded}, or "
        "appservice.as_token differs from the as_token in the registration it loaded",
        "add registration.yaml to the homeserver's app_service_config_files and restart the "
        "homeserver (it reads registrations only at start); if appservice.as_token was "
        "changed, " + REGENERATE,
    )


class HomeserverChecks:
    """The questions asked of the homeserver, on a session of their own: they are not counted
    with the bridge's requests and wait out no rate limits."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession, *,
                 registration_as_token: str | None = None) -> None:
        self.settings = settings
        self.registration_as_token = registration_as_token
        self.session = session
        self.url = settings.homeserver_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {settings.as_token}"}

    def _unknown_token(self, detail: str) -> Problem:
        return unknown_as_token(detail, self.registration_as_token, self.settings.as_token)

    def unreachable(self, reason: str) -> Unreachable:
        return Unreachable(
            "homeserver",
            f"the homeserver at {self.url} (homeserver.address) is unreachable: {reason}",
            "start the homeserver, or correct homeserver.address (the client-server API's "
            "base URL as the bridge reaches it)",
            reason=reason,
        )

    async def _call(self, method: str, path: str, *, auth: bool = True,
                    params: dict[str, str] | None = None, body: Any = None,
                    limit: aiohttp.ClientTimeout = CHECK_TIMEOUT,
                    ) -> tuple[int, Any, str | None] | Unreachable:
        try:
            async with self.session.request(
                method, self.url + path, params=params, json=body, timeout=limit,
                headers=self._auth if auth else None,
            ) as resp:
                text = await resp.text(errors="replace")
                status, server = resp.status, resp.headers.get("Server")
        except TimeoutError:
            return self.unreachable(f"no answer within {limit.total:g} s")
        except aiohttp.ClientConnectorError as e:
            return self.unreachable(f"cannot connect ({e.os_error.strerror or e.os_error})")
        except aiohttp.ClientError as e:
            return self.unreachable(str(e) or type(e).__name__)
        if status in (502, 503, 504) and not path.endswith("/ping"):
            return self.unreachable(f"HTTP {status} (a proxy in front of it, but no homeserver)")
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        return status, data, server

    async def versions(self) -> Versions | Problem:
        """``GET /_matrix/client/versions``: is a Matrix homeserver there at all?"""
        got = await self._call("GET", "/_matrix/client/versions", auth=False)
        if isinstance(got, Problem):
            return got
        status, data, server = got
        if status != 200 or not isinstance(data, dict) or "versions" not in data:
            return Problem(
                "homeserver",
                f"{self.url} (homeserver.address) answers GET /_matrix/client/versions with "
                f"HTTP {status}, not as a Matrix homeserver",
                "correct homeserver.address: the client-server API's base URL, without "
                "/_matrix",
            )
        return Versions([str(v) for v in data["versions"]], server)

    async def whoami(self) -> Problem | None:
        """The as_token is accepted, and the bot is the bot the config names."""
        got = await self._call("GET", "/_matrix/client/v3/account/whoami")
        if isinstance(got, Problem):
            return got
        status, data, _ = got
        if status == 401:
            return self._unknown_token(_errcode(status, data))
        user_id = data.get("user_id") if status == 200 and isinstance(data, dict) else None
        if not isinstance(user_id, str):
            return Problem("registration", f"the homeserver answers whoami with the as_token "
                           f"with {_errcode(status, data)}", "see the homeserver's log")
        expected = self.settings.bot_user_id
        if user_id == expected:
            return None
        localpart, _, domain = user_id[1:].partition(":")
        if domain != self.settings.domain:
            return Problem(
                "registration",
                f"the homeserver names the bridge's bot {user_id}, on the domain {domain}, but "
                f"homeserver.domain is {self.settings.domain}",
                f"set homeserver.domain to {domain} (the part after the colon in its user "
                "IDs), run `dmbridge generate` again, restart the homeserver (it reads "
                "registrations only at start), then start the bridge",
                fatal=True,
            )
        return Problem(
            "registration",
            f"the registration the homeserver loaded names the bot {user_id} "
            f"(sender_localpart {localpart}), the config {expected} "
            "(appservice.bot_username)",
            REGENERATE,
        )

    async def namespace(self, network: Network) -> Problem | None:
        """Are this network's ghosts in the namespaces of the registration the homeserver
        loaded? Asked as whoami for a ghost that need not exist (nothing is created)."""
        probe = f"@{network.localpart_prefix}{PROBE_LOCALPART}{network.localpart_suffix}" \
                f":{self.settings.domain}"
        got = await self._call("GET", "/_matrix/client/v3/account/whoami",
                               params={"user_id": probe})
        if isinstance(got, Problem):
            return got
        status, data, _ = got
        message = data.get("error", "") if isinstance(data, dict) else ""
        if status == 200 or "has not registered this user" in message:
            return None
        check = f"network {network.id}"
        if status == 401:
            return self._unknown_token(_errcode(status, data))
        if status == 403 and ("masquerade" in message or "namespace" in message):
            return Problem(
                check,
                f"the ghosts of network {network.id} ({probe}) are not in the namespaces of "
                "the registration the homeserver loaded, so they cannot be used (the network "
                "was added, or its ghost_localpart changed, after the registration was "
                f"loaded; the homeserver says: {message})",
                REGENERATE,
            )
        return Problem(check, f"the homeserver answers a whoami for {probe} with "
                       f"{_errcode(status, data)}", "see the homeserver's log")

    async def ping(self) -> Problem | int | None:
        """The homeserver calls the bridge back: the round trip in ms, or why it failed; None
        if the homeserver does not offer the ping (older than Matrix v1.7)."""
        started = time.monotonic()
        path = f"/_matrix/client/v1/appservice/{quote(self.settings.appservice_id, safe='')}" \
               "/ping"
        got = await self._call("POST", path, body={"transaction_id": "dmbridge-check-"
                                                   + secrets.token_hex(4)},
                               limit=PING_TIMEOUT)
        if isinstance(got, Problem):
            return got
        status, data, _ = got
        data = data if isinstance(data, dict) else {}
        if status == 200:
            duration = data.get("duration_ms")
            if isinstance(duration, int | float) and not isinstance(duration, bool):
                return max(0, int(duration))
            return round((time.monotonic() - started) * 1000)  # our own measure, for an idea
        if status in (404, 405) and data.get("errcode", "M_UNRECOGNIZED") == "M_UNRECOGNIZED":
            return None
        address = self.settings.appservice_address
        errcode = data.get("errcode")
        if status == 401:
            return self._unknown_token(_errcode(status, data))
        if errcode == "M_BAD_STATUS" and data.get("status") in (401, 403):
            return Problem(
                "ping",
                f"the homeserver reached the bridge at {address}, but with an hs_token the "
                f"bridge refuses (the bridge answered {data.get('status')}): appservice.hs_token "
                "differs from the hs_token in the registration the homeserver loaded, so no "
                "event from Matrix reaches the bridge",
                REGENERATE,
            )
        if errcode == "M_BAD_STATUS":
            return Problem(
                "ping",
                f"the homeserver reached {address} (appservice.address), but what answered "
                f"there said HTTP {data.get('status')}: is it this bridge?",
                "correct appservice.address (the URL at which the homeserver reaches this "
                f"bridge), then {REGENERATE}",
            )
        if errcode in ("M_CONNECTION_FAILED", "M_CONNECTION_TIMEOUT"):
            return Problem(
                "ping",
                f"the homeserver could not reach the bridge at {address} (appservice.address): "
                f"{errcode} {data.get('error', '')}".rstrip(),
                "check appservice.address, appservice.hostname, appservice.port and firewalls "
                f"between them; after changing appservice.address, {REGENERATE}",
            )
        if errcode == "M_FORBIDDEN":
            return Problem(
                "ping",
                f"the homeserver refused the ping for the appservice ID "
                f"{self.settings.appservice_id}: {data.get('error', '')}",
                f"the registration the homeserver loaded has another id; {REGENERATE}",
            )
        if errcode == "M_URL_NOT_SET":
            return Problem("ping", "the registration the homeserver loaded has no url, so "
                           "the homeserver never calls the bridge", REGENERATE)
        if status == 429:
            return Problem("ping", f"the homeserver rate-limits the bridge's self-check "
                           f"({_errcode(status, data)})", "it is tried again later")
        return Problem("ping", f"the homeserver answered the ping with {_errcode(status, data)}",
                       "see the homeserver's log")


def _errcode(status: int, data: Any) -> str:
    if isinstance(data, dict) and "errcode" in data:
        return f"{status} {data['errcode']}: {data.get('error', '')}".rstrip(": ")
    return f"HTTP {status}"
