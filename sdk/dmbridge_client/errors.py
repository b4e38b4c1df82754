"""Every error code of the platform API as an exception whose message says what to do."""

from __future__ import annotations

from typing import Any, ClassVar


class DmbridgeError(Exception):
    """Base of every error this package raises."""


class APIError(DmbridgeError):
    """The bridge answered with an error: ``status``, ``errcode`` and its ``error`` text.

    ``request_id`` is the bridge's ``X-Request-ID`` for the request: quote it when reporting a
    problem, every log line of the request carries it.
    """

    errcode: ClassVar[str] = "M_UNKNOWN"
    advice: ClassVar[str] = "the bridge failed unexpectedly; its log has the details"

    def __init__(self, status: int, errcode: str, error: str, *,
                 request_id: str | None = None, body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.error = error
        self.request_id = request_id
        self.body = body or {}
        self.code = errcode
        rid = f" [request {request_id}]" if request_id else ""
        super().__init__(f"{status} {errcode}: {error} -> {self.advice}{rid}")


class NotJSON(APIError):
    errcode = "M_NOT_JSON"
    advice = "send a JSON object encoded as UTF-8"


class BadJSON(APIError):
    errcode = "M_BAD_JSON"
    advice = "fix the request: a field is missing, empty or of the wrong type"


class InvalidParam(APIError):
    errcode = "M_INVALID_PARAM"
    advice = "fix the value the message names (an ID, a user ID, a media URI, a combination)"


class InvalidRemoteID(APIError):
    errcode = "DMBRIDGE_INVALID_REMOTE_ID"
    advice = "the sender does not match the network's remote_id_pattern; check which network " \
             "this user belongs to"


class MissingToken(APIError):
    errcode = "M_MISSING_TOKEN"
    advice = "pass the network's token to Client(..., token=...)"


class UnknownToken(APIError):
    errcode = "M_UNKNOWN_TOKEN"
    advice = "the token is none of the bridge's network tokens; check networks[].tokens in " \
             "its config"


class Forbidden(APIError):
    errcode = "M_FORBIDDEN"
    advice = "the token belongs to another network (or a media link expired); use this " \
             "network's token"


class UnknownNetwork(APIError):
    errcode = "DMBRIDGE_UNKNOWN_NETWORK"
    advice = "the network ID is not configured in the bridge; check Client(..., network=...)"


class UnknownRecipient(APIError):
    errcode = "DMBRIDGE_UNKNOWN_RECIPIENT"
    advice = "the Matrix user does not exist; check the user ID and stop writing to it"


class RecipientUnreachable(APIError):
    errcode = "DMBRIDGE_RECIPIENT_UNREACHABLE"
    advice = "the user's server is one this homeserver does not federate with; reach the " \
             "user another way"


class Unrecognized(APIError):
    errcode = "M_UNRECOGNIZED"
    advice = "the bridge does not serve this path or method; it may be older than this client"


class TooLarge(APIError):
    errcode = "M_TOO_LARGE"
    advice = "shorten the text or field, or send a smaller file"


class HomeserverError(APIError):
    errcode = "DMBRIDGE_HOMESERVER_ERROR"
    advice = "the homeserver failed; retry later with the same message ID (nothing is " \
             "posted twice)"


class Busy(APIError):
    errcode = "DMBRIDGE_BUSY"
    advice = "the DM is still being opened by another request; retry later with the same " \
             "message ID"


class Declined(APIError):
    errcode = "DMBRIDGE_DECLINED"
    advice = "the Matrix user does not accept DMs from this sender: stop writing to them and " \
             "fall back to another channel until they write first"


class NotPermitted(APIError):
    errcode = "DMBRIDGE_NOT_PERMITTED"
    advice = "the network may not write to this Matrix user (permissions.send_to); reach them " \
             "another way"


class NotFound(APIError):
    errcode = "M_NOT_FOUND"
    advice = "the target, DM or upload is unknown or deleted; open the DM or upload again"


class NotYourMessage(APIError):
    errcode = "DMBRIDGE_NOT_YOUR_MESSAGE"
    advice = "only the sender of a message can edit or delete it: another remote user's " \
             "message, or a Matrix user's (given by its event ID), cannot be edited"


class TargetInOtherRoom(APIError):
    errcode = "DMBRIDGE_TARGET_IN_OTHER_ROOM"
    advice = "the message is in an earlier DM room of the pair; send a new message instead " \
             "of replying, editing or reacting"


class DuplicateReaction(APIError):
    errcode = "DMBRIDGE_DUPLICATE_REACTION"
    advice = "the sender already reacted with this key under another reaction ID; nothing to do"


class GhostNotInRoom(APIError):
    errcode = "DMBRIDGE_GHOST_NOT_IN_ROOM"
    advice = "the message is in an earlier room the sender has left; it cannot be deleted"


class WrongContentType(APIError):
    errcode = "DMBRIDGE_WRONG_CONTENT_TYPE"
    advice = "the bytes are not what content_type says; pass the right type " \
             "(or application/octet-stream)"


class BodyTimeout(APIError):
    errcode = "DMBRIDGE_BODY_TIMEOUT"
    advice = "the request body came too slowly; send it again faster"


class NotReady(APIError):
    errcode = "DMBRIDGE_NOT_READY"
    advice = "the bridge is not ready (see the failing checks); retry once it is"


class ServerError(APIError):
    errcode = "M_UNKNOWN"
    advice = "the bridge failed unexpectedly; its log has the details under the request ID"


class RateLimited(APIError):
    """429: ``retry_after`` seconds to wait. Raised once the client's own retries are spent."""

    errcode = "M_LIMIT_EXCEEDED"
    advice = "retried until the client's limit; send the same request again after " \
             "retry_after seconds"

    def __init__(self, status: int, errcode: str, error: str, *, retry_after: float,
                 request_id: str | None = None, body: dict[str, Any] | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(status, errcode, error, request_id=request_id, body=body)


class QuotaExceeded(RateLimited):
    errcode = "DMBRIDGE_QUOTA_EXCEEDED"
    advice = "the network used up its quota (networks[].quotas); slow down and send the same " \
             "request again after retry_after seconds"


class UnexpectedAnswer(APIError):
    """An answer that is not the API's: another server, a proxy's error page, an unknown code."""

    errcode = ""
    advice = "is base_url the bridge's listener (http://host:port)? is a proxy in the way?"


class ConnectionFailed(DmbridgeError):
    """The bridge could not be reached, after the client's retries."""


class NotSupported(DmbridgeError):
    """The bridge lacks a feature this call needs; upgrade the bridge."""


class NoNetwork(DmbridgeError):
    """A router found no network whose remote ID pattern matches."""


class AmbiguousRemoteID(DmbridgeError):
    """A router found several networks whose remote ID pattern matches."""

    def __init__(self, remote_id: str, networks: list[str]) -> None:
        self.remote_id = remote_id
        self.networks = networks
        super().__init__(
            f"{remote_id!r} matches the remote ID patterns of {', '.join(networks)}: "
            f"pass network= to say which one it is")


ERRORS: dict[str, type[APIError]] = {cls.errcode: cls for cls in (
    NotJSON, BadJSON, InvalidParam, InvalidRemoteID, MissingToken, UnknownToken, Forbidden,
    UnknownNetwork, UnknownRecipient, RecipientUnreachable, Unrecognized, TooLarge,
    HomeserverError, Busy, Declined, NotPermitted, NotFound, NotYourMessage, TargetInOtherRoom,
    DuplicateReaction, GhostNotInRoom, WrongContentType, BodyTimeout, NotReady, ServerError,
    RateLimited, QuotaExceeded,
)}


def api_error(status: int, body: Any, request_id: str | None,
              retry_after: float | None) -> APIError:
    """The exception for an error answer."""
    if not isinstance(body, dict) or not isinstance(body.get("errcode"), str):
        text = str(body)[:200] if body is not None else "(no JSON body)"
        return UnexpectedAnswer(status, "", text, request_id=request_id)
    errcode: str = body["errcode"]
    error = str(body.get("error", ""))
    cls = ERRORS.get(errcode, UnexpectedAnswer)
    if issubclass(cls, RateLimited):
        return cls(status, errcode, error, retry_after=retry_after or 1.0,
                   request_id=request_id, body=body)
    return cls(status, errcode, error, request_id=request_id, body=body)
