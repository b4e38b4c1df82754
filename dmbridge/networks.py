"""Networks: the platforms configured to route DMs through the bridge, and their ghost IDs."""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from mautrix.types import UserID

from . import localpart
from .errors import InvalidRemoteID, UnknownNetwork
from .permissions import UserRules
from .quotas import QuotaSettings

PUSH, PULL = "webhook", "pull"
EVERYONE = UserRules(everyone=True, servers=frozenset(), users=frozenset())
DEFAULT_QUOTAS = QuotaSettings()


@dataclass(frozen=True)
class Delivery:
    """How the network receives what its users are owed: pushed to a webhook, or pulled."""

    mode: str = PULL
    url: str | None = None
    secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Network:
    id: str
    name: str
    domain: str
    ghost_localpart: str
    """Template with ``{network}`` and ``{remote_id}`` (the escaped remote ID, last)."""
    displayname: str
    """Template with ``{name}``, ``{remote_id}`` and ``{network_name}``."""
    remote_id_pattern: re.Pattern[str]
    tokens: tuple[str, ...] = field(repr=False)
    delivery: Delivery = Delivery()
    send_to: UserRules = EVERYONE
    """Matrix users this network may write to."""
    invites_from: UserRules = EVERYONE
    """Matrix users who may start a DM with this network's ghosts by inviting one."""
    quotas: QuotaSettings = DEFAULT_QUOTAS

    @property
    def localpart_prefix(self) -> str:
        return self.ghost_localpart.replace("{network}", self.id).split("{remote_id}")[0]

    @property
    def localpart_suffix(self) -> str:
        return self.ghost_localpart.replace("{network}", self.id).split("{remote_id}")[1]

    def check_remote_id(self, remote_id: str) -> None:
        if not isinstance(remote_id, str) or not self.remote_id_pattern.fullmatch(remote_id):
            raise InvalidRemoteID(
                f"'{remote_id}' is not a valid {self.id} user ID "
                f"(must match {self.remote_id_pattern.pattern})"
            )

    def ghost_user_id(self, remote_id: str) -> UserID:
        self.check_remote_id(remote_id)
        lp = self.localpart_prefix + localpart.escape(remote_id) + self.localpart_suffix
        return UserID(f"@{lp}:{self.domain}")

    def parse_ghost(self, user_id: str) -> str | None:
        """The remote ID behind a ghost user ID of this network, or None."""
        lp, sep, server = user_id.removeprefix("@").partition(":")
        if not user_id.startswith("@") or not sep or server != self.domain:
            return None
        prefix, suffix = self.localpart_prefix, self.localpart_suffix
        if not lp.startswith(prefix) or not lp.endswith(suffix) or len(lp) <= len(prefix):
            return None
        escaped = lp[len(prefix) : len(lp) - len(suffix)] if suffix else lp[len(prefix) :]
        try:
            remote_id = localpart.unescape(escaped)
        except localpart.LocalpartError:
            return None
        return remote_id if self.remote_id_pattern.fullmatch(remote_id) else None

    def ghost_displayname(self, remote_id: str, name: str | None) -> str:
        return self.displayname.format(
            name=name or remote_id, remote_id=remote_id, network_name=self.name
        )

    def namespace_regex(self) -> str:
        return (
            "^@" + re.escape(self.localpart_prefix) + ".+" + re.escape(self.localpart_suffix)
            + ":" + re.escape(self.domain) + "$"
        )

    def accepts_token(self, token: str) -> bool:
        # Compare against every token so timing does not tell which one (or how many) matched.
        matched = False
        for candidate in self.tokens:
            matched |= hmac.compare_digest(candidate.encode(), token.encode())
        return matched


class Networks:
    """The configured networks, looked up by ID, by ghost user ID, or by API token."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self._by_id = {n.id: n for n in networks}

    def __iter__(self) -> Iterator[Network]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, network_id: str) -> Network:
        try:
            return self._by_id[network_id]
        except KeyError:
            raise UnknownNetwork(f"no network '{network_id}' is configured") from None

    def parse_ghost(self, user_id: str) -> tuple[Network, str] | None:
        for network in self._by_id.values():
            remote_id = network.parse_ghost(user_id)
            if remote_id is not None:
                return network, remote_id
        return None

    def by_token(self, token: str) -> Network | None:
        found = None
        for network in self._by_id.values():
            if network.accepts_token(token):
                found = network
        return found
