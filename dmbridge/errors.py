"""Errors the bridge reports to platforms, each with its HTTP status and Matrix-style errcode."""

from __future__ import annotations

import math


class BridgeError(Exception):
    """An error with a precise answer for the caller; ``str(e)`` is safe to show."""

    status = 500
    errcode = "M_UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, str | int]:
        return {"errcode": self.errcode, "error": self.message}

    def headers(self) -> dict[str, str]:
        """Extra response headers the answer must carry."""
        return {}


class BadRequest(BridgeError):
    status = 400
    errcode = "M_BAD_JSON"


class NotJSON(BadRequest):
    errcode = "M_NOT_JSON"


class InvalidParam(BadRequest):
    errcode = "M_INVALID_PARAM"


class InvalidRemoteID(BadRequest):
    errcode = "DMBRIDGE_INVALID_REMOTE_ID"


class MissingToken(BridgeError):
    status = 401
    errcode = "M_MISSING_TOKEN"


class UnknownToken(BridgeError):
    status = 401
    errcode = "M_UNKNOWN_TOKEN"


class Forbidden(BridgeError):
    status = 403
    errcode = "M_FORBIDDEN"


class UnknownNetwork(BridgeError):
    status = 404
    errcode = "DMBRIDGE_UNKNOWN_NETWORK"


class UnknownRecipient(BridgeError):
    status = 404
    errcode = "DMBRIDGE_UNKNOWN_RECIPIENT"


class RecipientUnreachable(BridgeError):
    """The recipient's homeserver cannot be reached from ours (federation is off or denies it):
    no DM can be opened, and retrying will not help until the homeserver's admin changes that."""

    status = 422
    errcode = "DMBRIDGE_RECIPIENT_UNREACHABLE"


class NotFound(BridgeError):
    status = 404
    errcode = "M_NOT_FOUND"


class TooLarge(BridgeError):
    status = 413
    errcode = "M_TOO_LARGE"


class HomeserverError(BridgeError):
    """The homeserver refused or failed a request; the platform may retry later."""

    status = 502
    errcode = "DMBRIDGE_HOMESERVER_ERROR"


class RateLimited(BridgeError):
    """The homeserver's rate limits (or the bridge's own pacing) need longer than the request
    may wait; the platform tries again after ``retry_after`` seconds."""

    status = 429
    errcode = "M_LIMIT_EXCEEDED"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(retry_after, 0.001)

    def to_json(self) -> dict[str, str | int]:
        return {**super().to_json(), "retry_after_ms": math.ceil(self.retry_after * 1000)}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class QuotaExceeded(RateLimited):
    """The network used up one of its quotas (networks[].quotas)."""

    errcode = "DMBRIDGE_QUOTA_EXCEEDED"


class Busy(BridgeError):
    """Another request (maybe in another worker) holds the DM being opened for too long."""

    status = 503
    errcode = "DMBRIDGE_BUSY"


class NotReady(BridgeError):
    """The bridge is not started yet, or is stopping: an in-process call is refused as its
    listener would refuse it (retry once it runs)."""

    status = 503
    errcode = "DMBRIDGE_NOT_READY"


class Declined(BridgeError):
    """The Matrix user turned this contact down; nothing is sent until they reach out again."""

    status = 403
    errcode = "DMBRIDGE_DECLINED"


class NotPermitted(BridgeError):
    """The network's permissions do not cover this Matrix user."""

    status = 403
    errcode = "DMBRIDGE_NOT_PERMITTED"


def storable(value: str, what: str) -> str:
    """Text both databases and the homeserver can hold: no NUL, no lone surrogates."""
    if "\x00" in value:
        raise BadRequest(f"'{what}' must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{what}' is not valid Unicode (a lone surrogate)") from None
    return value
