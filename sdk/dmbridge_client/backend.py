"""How the client's calls reach the bridge: a :class:`Call` names an operation of the platform
API and carries its inputs; a :class:`Backend` performs it.

Over HTTP (:class:`~dmbridge_client.transport.Transport`, the default) a call becomes a
request to the bridge's listener; a program that runs the bridge in its own process gets a
backend that calls the bridge's operations directly (``dmbridge.embedded.client_for``). Either
way the answer is the API's JSON object (before ``parse``), and an error is the same
:class:`~dmbridge_client.errors.APIError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

# operationId (as in the bridge's openapi.yaml) -> method and path under /networks/{network}.
ROUTES: dict[str, tuple[str, str]] = {
    "getNetwork": ("GET", ""),
    "sendMessage": ("PUT", "/messages/{message_id}"),
    "deleteMessage": ("DELETE", "/messages/{message_id}"),
    "react": ("PUT", "/reactions/{reaction_id}"),
    "setGhostProfile": ("PUT", "/ghosts/{remote_id}/profile"),
    "uploadMedia": ("POST", "/media"),
    "openDM": ("POST", "/dms"),
    "listDMs": ("GET", "/dms"),
    "setTyping": ("PUT", "/typing"),
    "markRead": ("POST", "/read"),
    "pullEvents": ("GET", "/events"),
    "ackEvents": ("POST", "/events/ack"),
    "listDeadLetters": ("GET", "/dead-letters"),
    "retryDeadLetters": ("POST", "/dead-letters/retry"),
}


@dataclass(frozen=True)
class Call:
    """One operation of the API for one network.

    ``args`` are the values in its path (``message_id``, ``reaction_id``, ``remote_id``),
    ``body`` its JSON object, ``query`` its query parameters. An upload's ``content`` is bytes,
    a function giving the bytes (or a file) afresh for each attempt, or a stream sent once
    (``replayable`` false), of type ``content_type``. ``time_limit`` bounds a long poll;
    ``parse`` turns the answer into what the caller returns.
    """

    operation: str
    network: str
    args: Mapping[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    query: Mapping[str, str] | None = None
    content: Any = None
    content_type: str | None = None
    replayable: bool = True
    time_limit: float | None = None
    parse: Callable[[Any], Any] | None = None

    def path(self) -> str:
        """The call's path below the API root, its values escaped."""
        template = ROUTES[self.operation][1]
        values = {k: quote(v, safe="") for k, v in self.args.items()}
        return f"/networks/{quote(self.network, safe='')}" + template.format(**values)


class Backend(Protocol):
    """What a :class:`~dmbridge_client.Client` needs of the way to its bridge."""

    async def call(self, call: Call) -> Any:
        """The answer of ``call`` (``call.parse``'s result of it); an ``APIError`` if refused."""

    async def download(self, url: str) -> bytes:
        """The bytes behind a media link the bridge gave."""

    async def close(self) -> None:
        """Let go of what the backend holds (connections)."""
