"""Webhook signatures: HMAC-SHA256 over the timestamp and the exact body bytes.

Headers: ``X-Dmbridge-Timestamp: <unix seconds>`` and ``X-Dmbridge-Signature: sha256=<hex>``,
where hex = HMAC-SHA256(secret, f"{timestamp}." + body). Receivers should reject timestamps
more than :data:`REPLAY_WINDOW` seconds from their clock, and drop repeats by the
``Idempotency-Key`` header.
"""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-Dmbridge-Timestamp"
SIGNATURE_HEADER = "X-Dmbridge-Signature"
REPLAY_WINDOW = 300


def signature(secret: str, timestamp: int | str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def sign(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The headers that prove a delivery came from the bridge."""
    timestamp = int(time.time() if now is None else now)
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: signature(secret, timestamp, body)}


def verify(secret: str, timestamp: str, sig: str, body: bytes, *, now: float | None = None,
           window: int = REPLAY_WINDOW) -> bool:
    """What a receiver does: a fresh timestamp, and a signature that matches in constant time."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    if age > window:
        return False
    if not sig.isascii():
        return False
    return hmac.compare_digest(signature(secret, timestamp, body).encode(), sig.encode())
