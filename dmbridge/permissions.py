"""Who a network may write to, and who may start DMs with its ghosts."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_SERVER = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_USER = re.compile(r"@[\x21-\x39\x3b-\x7e]+:.+")


class RuleError(ValueError):
    pass


@dataclass(frozen=True)
class UserRules:
    """A list of ``*`` (everyone), server names and user IDs; empty allows nobody."""

    everyone: bool
    servers: frozenset[str]
    users: frozenset[str]

    @classmethod
    def parse(cls, entries: Iterable[object]) -> UserRules:
        everyone, servers, users = False, set(), set()
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                raise RuleError(f"{entry!r} is not '*', a server name or a user ID")
            entry = entry.strip()
            if entry == "*":
                everyone = True
            elif _USER.fullmatch(entry) and _SERVER.fullmatch(entry.split(":", 1)[1]):
                users.add(entry)
            elif _SERVER.fullmatch(entry):
                servers.add(entry.lower())
            else:
                raise RuleError(f"{entry!r} is not '*', a server name or a user ID")
        return cls(everyone, frozenset(servers), frozenset(users))

    def allows(self, user_id: str) -> bool:
        if self.everyone or user_id in self.users:
            return True
        _, _, server = user_id.partition(":")
        return server.lower() in self.servers

    @property
    def nobody(self) -> bool:
        return not (self.everyone or self.servers or self.users)
