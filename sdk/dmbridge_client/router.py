"""Several networks in one program: the network is picked by the remote ID's format."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable
from datetime import datetime

from .client import Client, TargetLike
from .dm import DM
from .errors import AmbiguousRemoteID, DmbridgeError, NoNetwork, NotSupported
from .models import Sent, Upload

log = logging.getLogger("dmbridge_client")


class Router:
    """Picks, for a remote ID, the one client whose network's ``remote_id_pattern`` matches it.

    A client's pattern is the one given to ``Client(..., remote_id_pattern=...)``, else the
    ``remote_id_pattern`` of the bridge's description of the network (``GET
    /networks/{network}``, asked once, on first use; kept as ``client.info``). Two matching
    networks raise :class:`AmbiguousRemoteID` (pass ``network=``); none raises
    :class:`NoNetwork`.

    A network whose description cannot be had is left out (logged) and the others are routed
    among; it is asked again ``rediscover_after`` seconds later. A bridge that describes no
    network raises :class:`NotSupported` (give the patterns). ``network=`` needs no pattern.
    """

    def __init__(self, clients: Iterable[Client], *, rediscover_after: float = 60.0) -> None:
        self.clients = {client.network: client for client in clients}
        self.rediscover_after = rediscover_after
        self.undiscovered: dict[str, float] = {}  # network -> when its discovery failed

    async def discover(self) -> None:
        """Ask the bridge to describe every network that was given no pattern (at once); a
        failure is logged and that network left out until ``rediscover_after`` has passed."""
        now = time.monotonic()
        asking = [c for c in self.clients.values() if c.remote_id_pattern is None and
                  now - self.undiscovered.get(c.network, -self.rediscover_after)
                  >= self.rediscover_after]
        results = await asyncio.gather(*(c.network_info() for c in asking),
                                       return_exceptions=True)
        for client, result in zip(asking, results, strict=True):
            if isinstance(result, DmbridgeError) and not isinstance(result, NotSupported):
                self.undiscovered[client.network] = now
                log.warning("left network %s out of routing: describing it failed: %s",
                            client.network, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                self.undiscovered.pop(client.network, None)

    async def client_for(self, remote_id: str, *, network: str | None = None) -> Client:
        if network is not None:
            if network not in self.clients:
                raise NoNetwork(f"no client for network {network!r}; the router has "
                                f"{', '.join(self.clients) or 'none'}")
            return self.clients[network]
        await self.discover()
        matching = [c for c in self.clients.values() if c.remote_id_pattern is not None
                    and re.fullmatch(c.remote_id_pattern, remote_id) is not None]
        if not matching:
            unknown = [n for n, c in self.clients.items() if c.remote_id_pattern is None]
            left_out = f" (not described: {', '.join(unknown)})" if unknown else ""
            raise NoNetwork(f"{remote_id!r} matches the remote ID pattern of none of the "
                            f"networks {', '.join(self.clients) or '(none)'}{left_out}")
        if len(matching) > 1:
            raise AmbiguousRemoteID(remote_id, [c.network for c in matching])
        return matching[0]

    async def open_dm(self, sender: str, user_id: str, *, network: str | None = None,
                      name: str | None = None, avatar: Upload | str | None = None,
                      new: bool = False) -> DM:
        """``Client.open_dm`` on the network ``sender`` belongs to."""
        client = await self.client_for(sender, network=network)
        return await client.open_dm(sender, user_id, name=name, avatar=avatar, new=new)

    async def create_dm(self, sender: str, user_id: str, *, network: str | None = None,
                        replaces: DM | str | None = None, name: str | None = None,
                        avatar: Upload | str | None = None) -> DM:
        """``Client.create_dm`` on the network ``sender`` belongs to."""
        client = await self.client_for(sender, network=network)
        return await client.create_dm(sender, user_id, replaces=replaces, name=name,
                                      avatar=avatar)

    async def send_message(self, sender: str, user_id: str, text: str | None = None, *,
                           network: str | None = None, html: str | None = None,
                           markdown: str | None = None, media: Upload | str | None = None,
                           reply_to: TargetLike | None = None, msgtype: str | None = None,
                           name: str | None = None, avatar: Upload | str | None = None,
                           thread_root: TargetLike | None = None,
                           message_id: str | None = None,
                           ts: datetime | int | None = None) -> Sent:
        """``Client.send_message`` on the network ``sender`` belongs to."""
        client = await self.client_for(sender, network=network)
        return await client.send_message(
            sender, user_id, text, html=html, markdown=markdown, media=media,
            reply_to=reply_to, msgtype=msgtype, name=name, avatar=avatar,
            thread_root=thread_root, message_id=message_id, ts=ts)

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
