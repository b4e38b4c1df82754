"""Receiving the network's events by webhook: signature, replay window, repeats, handlers.

The bridge signs each attempt: ``X-Dmbridge-Timestamp`` (Unix seconds) and
``X-Dmbridge-Signature`` (``sha256=`` and the hex HMAC-SHA256, keyed with the network's
``delivery.secret``, of the timestamp, a ``.`` and the raw body). A request whose signature
does not match, or whose timestamp is more than ``window`` seconds from this clock, is answered
``401`` and never reaches a handler. An event already handled (same ``idempotency_key``) is
answered ``200`` at once; one still being handled waits for that run. A handler that raises
makes the answer ``500``, so the bridge sends the event again later, with backoff.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler

if TYPE_CHECKING:
    from .client import Client

TIMESTAMP_HEADER = "X-Dmbridge-Timestamp"
SIGNATURE_HEADER = "X-Dmbridge-Signature"
REPLAY_WINDOW = 300

log = logging.getLogger("dmbridge_client")


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verified(secret: str, timestamp: str, sig: str, body: bytes, *,
             window: int = REPLAY_WINDOW, now: float | None = None) -> bool:
    """True for a signature the secret made over this body, at a time within ``window``."""
    if not timestamp.isascii() or not timestamp.isdigit() or not sig.isascii():
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > window:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body).encode(), sig.encode())


def _error(status: int, errcode: str, error: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": error}, status=status)


def webhook_handler(client: Client, secret: str, *, window: int = REPLAY_WINDOW) -> Handler:
    """A request handler to mount on the platform's own aiohttp application."""
    if not secret:
        raise ValueError("the webhook secret is empty: pass the network's delivery.secret")

    async def receive(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if not verified(secret, request.headers.get(TIMESTAMP_HEADER, ""),
                        request.headers.get(SIGNATURE_HEADER, ""), body, window=window):
            log.warning("refused a webhook request from %s: bad signature or stale timestamp",
                        request.remote)
            return _error(401, "M_FORBIDDEN", "bad signature or timestamp")
        try:
            event = json.loads(body)
        except ValueError:
            return _error(400, "M_NOT_JSON", "the body is not JSON")
        if not isinstance(event, dict):
            return _error(400, "M_BAD_JSON", "the body is not a JSON object")
        try:
            await client.dispatch(event)
        except Exception:
            log.exception("the handler of event %s (%s) failed; the bridge will send it again",
                          event.get("id"), event.get("type"))
            return _error(500, "M_UNKNOWN", "the handler failed")
        return web.json_response({})

    return receive


def webhook_app(client: Client, secret: str, *, path: str = "/",
                window: int = REPLAY_WINDOW) -> web.Application:
    """An application that receives the webhook at ``path``; run it or add it as a sub-app."""
    app = web.Application()
    app.router.add_post(path, webhook_handler(client, secret, window=window))
    return app
