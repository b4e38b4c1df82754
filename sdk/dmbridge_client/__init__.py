"""An async client for dmbridge's platform API.

    async with Client("http://127.0.0.1:29340", token, "sms") as client:
        dm = await client.open_dm("+15551234567", "@alice:example.org", name="Parcel Service")
        await dm.send("Your parcel has arrived.")
"""

from .backend import Backend, Call
from .client import Client, TargetLike, UploadSource, new_message_id
from .dm import DM
from .errors import (
    AmbiguousRemoteID,
    APIError,
    BadJSON,
    BodyTimeout,
    Busy,
    ConnectionFailed,
    Declined,
    DmbridgeError,
    DuplicateReaction,
    Forbidden,
    GhostNotInRoom,
    HomeserverError,
    InvalidParam,
    InvalidRemoteID,
    MissingToken,
    NoNetwork,
    NotFound,
    NotJSON,
    NotPermitted,
    NotReady,
    NotSupported,
    NotYourMessage,
    QuotaExceeded,
    RateLimited,
    RecipientUnreachable,
    ServerError,
    TargetInOtherRoom,
    TooLarge,
    UnexpectedAnswer,
    UnknownNetwork,
    UnknownRecipient,
    UnknownToken,
    Unrecognized,
    WrongContentType,
)
from .events import (
    Deletion,
    DeliveryFailed,
    DirectMessage,
    Edit,
    Event,
    Media,
    Notice,
    Reaction,
    ReadReceipt,
    Target,
    Typing,
)
from .models import Deleted, DMInfo, Limits, NetworkInfo, Quotas, Sent, Upload, escape_remote_id
from .router import Router
from .transport import Transport
from .webhook import verified, webhook_handler

__all__ = [
    "DM", "APIError", "AmbiguousRemoteID", "Backend", "BadJSON", "BodyTimeout", "Busy", "Call",
    "Client", "ConnectionFailed", "DMInfo", "Declined", "Deleted", "Deletion", "DeliveryFailed",
    "DirectMessage", "DmbridgeError", "DuplicateReaction", "Edit", "Event", "Forbidden",
    "GhostNotInRoom", "HomeserverError", "InvalidParam", "InvalidRemoteID", "Limits", "Media",
    "MissingToken", "NetworkInfo", "NoNetwork", "NotFound", "NotJSON", "NotPermitted", "NotReady",
    "NotSupported", "NotYourMessage", "Notice", "QuotaExceeded", "Quotas", "RateLimited",
    "Reaction", "ReadReceipt", "RecipientUnreachable", "Router", "Sent", "ServerError", "Target",
    "TargetInOtherRoom", "TargetLike", "TooLarge", "Transport", "Typing", "UnexpectedAnswer",
    "UnknownNetwork", "UnknownRecipient", "UnknownToken", "Unrecognized", "Upload", "UploadSource",
    "WrongContentType", "escape_remote_id", "new_message_id", "verified", "webhook_handler"
]
