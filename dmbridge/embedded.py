"""The platform SDK for a program that runs the bridge in its own process.

``client_for(bridge, "sms")`` is a ``dmbridge_client.Client`` for one of the bridge's networks,
with the listener's address, the network's first token and its remote ID pattern filled in,
so code written against the SDK runs unchanged beside an embedded bridge (over the loopback
listener, with every check and guarantee of the HTTP API).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dmbridge_client import Client

    from .bridge import Bridge


def client_for(bridge: Bridge, network: str, **options: Any) -> Client:
    """An SDK client of ``network`` on this bridge; ``options`` go to ``Client``."""
    try:
        from dmbridge_client import Client
    except ImportError:
        raise ImportError("the platform SDK is not installed: pip install ./sdk "
                          "(dmbridge-client)") from None
    settings = bridge.settings
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        settings.hostname, settings.hostname)
    if ":" in host and not host.startswith("["):  # an IPv6 literal goes in brackets in a URL
        host = f"[{host}]"
    net = settings.networks.get(network)
    options.setdefault("remote_id_pattern", net.remote_id_pattern.pattern)
    return Client(f"http://{host}:{settings.port}", net.tokens[0], network, **options)
