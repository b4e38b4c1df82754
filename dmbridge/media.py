"""Media both ways: platforms upload files (checked, then stored on the homeserver), and fetch
Matrix users' media through signed, time-limited links the bridge serves from the homeserver.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import tempfile
import time
import unicodedata
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import aiohttp
import filetype
import imagesize
from aiohttp.web import RequestPayloadError
from mautrix.errors import MatrixRequestError
from mautrix.types import ContentURI

from .config import Settings
from .db import Stores, now_ms
from .db.media import Media
from .errors import (
    BadRequest,
    BridgeError,
    Forbidden,
    HomeserverError,
    InvalidParam,
    NotFound,
    RateLimited,
    TooLarge,
)
from .homeserver import Homeserver
from .networks import Network

log = logging.getLogger("dmbridge.media")

MXC = re.compile(r"mxc://(?!\.{1,2}/)([A-Za-z0-9.\-:\[\]]+)/([A-Za-z0-9_\-]+)")
_MIME = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+\-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+\-]{0,127}")
_SNIFF_BYTES = 8192
# Names a sniffed type goes by in Content-Type headers.
_ALIASES = {
    "image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "audio/mp3": "audio/mpeg",
    "audio/wav": "audio/x-wav", "audio/wave": "audio/x-wav", "audio/vnd.wave": "audio/x-wav",
    "audio/flac": "audio/x-flac", "audio/x-m4a": "audio/mp4", "audio/m4a": "audio/mp4",
    "video/avi": "video/x-msvideo", "video/matroska": "video/x-matroska",
    "audio/x-matroska": "video/x-matroska", "image/x-png": "image/png",
    "application/x-zip-compressed": "application/zip", "image/vnd.microsoft.icon": "image/x-icon",
}
# Formats that are zip files inside: a sniffer may call them application/zip.
_ZIP_BASED = re.compile(r"application/(vnd\.openxmlformats-.*|vnd\.oasis\.opendocument\..*|"
                        r"epub\+zip|java-archive|vnd\.android\.package-archive|.*\+zip)")
# A sniffer's name for bytes that are also rightly called by the second name.
_SAME_BYTES = frozenset({("image/apng", "image/png"), ("audio/ogg", "audio/opus"),
                         ("video/ogg", "audio/ogg"), ("audio/ogg", "video/ogg")})
# Kinds whose bytes always carry a signature the sniffer knows; anything else in them is a lie.
_CHECKED_KINDS = ("image/", "audio/", "video/")


class WrongContentType(BridgeError):
    """The upload's bytes are not what its Content-Type says."""

    status = 415
    errcode = "DMBRIDGE_WRONG_CONTENT_TYPE"


class TooManyUploads(RateLimited):
    """The network has as many uploads in progress as it may have at once."""


def msgtype_for(mimetype: str) -> str:
    kind = mimetype.split("/", 1)[0]
    return {"image": "m.image", "video": "m.video", "audio": "m.audio"}.get(kind, "m.file")


def declared_type(header: str | None) -> str:
    """The media type of a Content-Type header, parameters dropped; 400 if there is none."""
    value = (header or "").split(";", 1)[0].strip().lower()
    if not value:
        raise BadRequest("an upload needs a Content-Type header naming its media type")
    if not _MIME.fullmatch(value):
        raise InvalidParam(f"Content-Type {value!r} is not a media type (type/subtype)")
    if value.startswith("multipart/"):
        raise InvalidParam("send the file's own bytes as the body with its own Content-Type,"
                           " not a multipart form")
    return _ALIASES.get(value, value)


def checked_type(declared: str, head: bytes) -> str:
    """The upload's type, once its first bytes agree with what the platform declared."""
    sniffed = filetype.guess_mime(head)
    if sniffed is None:
        if declared.startswith(_CHECKED_KINDS):
            raise WrongContentType(f"the content is not a recognisable {declared} file")
        return declared
    if declared in ("application/octet-stream", sniffed):
        return sniffed
    if (sniffed, declared) in _SAME_BYTES:
        return declared
    if sniffed == "application/zip" and _ZIP_BASED.fullmatch(declared):
        return declared
    same_container = sniffed.split("/")[1] == declared.split("/")[1] and {
        sniffed.split("/")[0], declared.split("/")[0]} <= {"audio", "video"}
    if same_container:  # an mp4 or ogg holding only sound: the platform knows better
        return declared
    raise WrongContentType(f"the content is {sniffed}, but Content-Type says {declared}")


def safe_filename(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    # No controls, and no bidi overrides or other format characters that disguise a name
    # ("a\u202egnp.exe" shows as "aexe.png").
    if name in ("", ".", "..") or len(name) > 255 or any(
            unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") for c in name):
        raise InvalidParam("'filename' must be a plain file name of 1 to 255 characters")
    return name


@dataclass(frozen=True)
class Link:
    url: str
    expires_at: int


class MediaLinks:
    """Signed links to a Matrix user's media, bound to one network and valid for a while."""

    def __init__(self, secret: str, public_url: str, ttl: float) -> None:
        self._key = hmac.new(secret.encode(), b"dmbridge media links", hashlib.sha256).digest()
        self.public_url = public_url.rstrip("/")
        self.ttl = ttl

    def _signature(self, network: str, content_uri: str, expires_at: int) -> str:
        message = f"{network}\n{content_uri}\n{expires_at}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def make(self, network: str, content_uri: str, now: float | None = None) -> Link:
        match = MXC.fullmatch(content_uri)
        if match is None:
            raise ValueError(f"not a content URI: {content_uri!r}")
        expires_at = int(((time.time() if now is None else now) + self.ttl) * 1000)
        sig = self._signature(network, content_uri, expires_at)
        url = (f"{self.public_url}/_dmbridge/v1/networks/{network}/media/{match[1]}/{match[2]}"
               f"?expires={expires_at}&sig={sig}")
        return Link(url, expires_at)

    def check(self, network: str, content_uri: str, expires: str | None, sig: str | None,
              now: float | None = None) -> None:
        """Refuse a link that was not made for this network and media, or has expired."""
        if not expires or not sig or not (expires.isascii() and expires.isdigit()) or len(
                expires) > 15 or not sig.isascii():
            raise Forbidden("the media link needs its 'expires' and 'sig' parameters")
        if not hmac.compare_digest(self._signature(network, content_uri, int(expires)), sig):
            raise Forbidden("the media link's signature does not match")
        if int(expires) < (time.time() if now is None else now) * 1000:
            raise Forbidden("the media link has expired; the event's newer copy has a fresh one")

    def attach(self, event: dict[str, Any]) -> dict[str, Any]:
        """Give an event's media a fresh link, as the platform receives it."""
        message = event.get("message")
        media = message.get("media") if isinstance(message, dict) else None
        if isinstance(media, dict) and isinstance(media.get("content_uri"), str):
            try:
                link = self.make(str(event.get("network")), media["content_uri"])
            except ValueError:
                return event
            media["url"], media["expires_at"] = link.url, link.expires_at
        return event


class MediaService:
    """Uploads from platforms, and downloads on their behalf."""

    def __init__(self, *, settings: Settings, stores: Stores, homeserver: Homeserver,
                 links: MediaLinks) -> None:
        self.max_bytes = settings.media.max_upload_bytes
        self.max_uploads = settings.listener.max_uploads_per_network
        self._uploading: dict[str, int] = {}
        self.stores = stores
        self.homeserver = homeserver
        self.links = links

    async def upload(self, network: Network, chunks: AsyncIterator[bytes], *,
                     content_type: str | None, length: int | None, filename: str | None
                     ) -> Media:
        """Spool the bytes (refusing more than the limit), check them, store them on the HS."""
        declared = declared_type(content_type)
        name = safe_filename(filename)
        if length is not None and length > self.max_bytes:
            raise TooLarge(f"the upload is {length} bytes; the limit is {self.max_bytes}"
                           " (media.max_upload_bytes)")
        uploading = self._uploading.get(network.id, 0)
        if uploading >= self.max_uploads:
            raise TooManyUploads(f"network '{network.id}' already has {uploading} uploads in "
                                 "progress (appservice.listener.max_uploads_per_network); "
                                 "retry when one has finished", retry_after=1)
        self._uploading[network.id] = uploading + 1
        try:
            return await self._upload(network, chunks, declared, name)
        finally:
            self._uploading[network.id] -= 1
            if not self._uploading[network.id]:
                del self._uploading[network.id]

    async def _upload(self, network: Network, chunks: AsyncIterator[bytes], declared: str,
                      name: str | None) -> Media:
        # An unnamed file: it goes away when closed, also when the body stalls or is cut.
        with tempfile.TemporaryFile(prefix="dmbridge-upload-") as spool:
            size = await _spool(chunks, spool, self.max_bytes)
            if size == 0:
                raise BadRequest("the upload is empty")
            spool.seek(0)
            mimetype = checked_type(declared, spool.read(_SNIFF_BYTES))
            width = height = None
            if mimetype.startswith("image/"):
                width, height = _dimensions(spool)
            spool.seek(0)
            content_uri = await self._store(spool, mimetype, name, size)
        media = Media(ContentURI(content_uri), network.id, mimetype, size, name, width, height)
        await self.stores.media.add(media, now_ms())
        log.info("%s uploaded %s (%s, %d bytes%s)", network.id, content_uri, mimetype, size,
                 f", {width}x{height}" if width else "")
        return media

    async def _store(self, spool: BinaryIO, mimetype: str, name: str | None, size: int) -> str:
        try:
            return await self.homeserver.upload(spool, mimetype, name, size)
        except MatrixRequestError as e:
            if e.http_status == 413:
                raise TooLarge(f"the homeserver refused {size} bytes as too large: {e.message}"
                               " (lower media.max_upload_bytes to its max_upload_size)") from e
            raise HomeserverError(f"the homeserver refused the upload: {e}") from e
        except (TimeoutError, aiohttp.ClientError) as e:
            raise HomeserverError(f"the homeserver could not be reached to upload: {e!r}") from e

    async def uploaded(self, network: Network, content_uri: str, what: str) -> Media:
        """Media this network uploaded, by its content URI; 404 for anything else."""
        if not isinstance(content_uri, str) or not MXC.fullmatch(content_uri):
            raise InvalidParam(f"'{what}' must be an mxc:// content URI from POST .../media")
        media = await self.stores.media.get(network.id, content_uri)
        if media is None:
            raise NotFound(f"{content_uri} was not uploaded by network '{network.id}' through"
                           " POST .../media")
        return media


    async def open_download(self, network: Network, server: str, media_id: str,
                            expires: str | None, sig: str | None) -> aiohttp.ClientResponse:
        """Check the link, then open the homeserver's copy; the caller streams and releases it."""
        content_uri = f"mxc://{server}/{media_id}"
        if not MXC.fullmatch(content_uri):
            raise NotFound(f"{content_uri} is not a content URI")
        self.links.check(network.id, content_uri, expires, sig)
        try:
            return await self.homeserver.download(server, media_id)
        except MatrixRequestError as e:
            if e.http_status == 404:
                raise NotFound(f"the homeserver has no media {content_uri}") from e
            raise HomeserverError(f"the homeserver refused the media {content_uri}: {e}") from e
        except (TimeoutError, aiohttp.ClientError) as e:
            raise HomeserverError(f"the homeserver could not be reached for {content_uri}:"
                                  f" {e!r}") from e


def media_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """What a download answers with: the homeserver's type and name, never sniffed or cached."""
    headers = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff",
               "Content-Type": upstream.get("Content-Type", "application/octet-stream")}
    if "Content-Disposition" in upstream:
        headers["Content-Disposition"] = upstream["Content-Disposition"]
    return headers


async def _spool(chunks: AsyncIterator[bytes], spool: BinaryIO, limit: int) -> int:
    size = 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the upload exceeds the limit of {limit} bytes"
                               " (media.max_upload_bytes)")
            spool.write(chunk)
    except (ConnectionResetError, RequestPayloadError) as e:
        # The client went away or garbled its body: nothing to keep, nothing to trace.
        log.info("an upload was cut off after %d bytes: %r", size, e)
        raise BadRequest(f"the upload ended after {size} bytes, before its end") from e
    spool.flush()
    return size


def _dimensions(spool: BinaryIO) -> tuple[int | None, int | None]:
    spool.seek(0)
    try:
        width, height = imagesize.get(spool)
    except (ValueError, OSError, EOFError) as e:
        log.info("could not read the image's dimensions: %r", e)
        return None, None
    if width <= 0 or height <= 0:
        return None, None
    return width, height


def content_info(media: Media) -> dict[str, Any]:
    """The ``info`` block of an m.image / m.file / ... event."""
    info: dict[str, Any] = {"mimetype": media.mimetype, "size": media.size}
    if media.width and media.height:
        info["w"], info["h"] = media.width, media.height
    return info
