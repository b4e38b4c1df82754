"""Media rules: declared and sniffed types, file names, signed links, and the upload path.

The pure functions need nothing; MediaService.upload runs against a fake homeserver and the
``stores`` fixture (both database backends).
"""

from __future__ import annotations

import copy
import io
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterable
from types import SimpleNamespace
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qs, urlsplit

import pytest
from mautrix.types import ContentURI

from dmbridge.db import Stores
from dmbridge.db.media import Media
from dmbridge.errors import BadRequest, Forbidden, InvalidParam, TooLarge
from dmbridge.homeserver import Homeserver
from dmbridge.listener import ListenerSettings
from dmbridge.media import (
    MediaLinks,
    MediaService,
    WrongContentType,
    checked_type,
    declared_type,
    msgtype_for,
    safe_filename,
)
from tests.unit.test_networks import make_network

SMS = make_network()
CHAT = make_network("chat", pattern=r"[A-Za-z0-9_]{1,32}", tokens=("chat-token-0123456789",))


def png(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    raw = b"".join(b"\0" + b"\xff\0\0" * w for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def gif(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x80\x00\x00" + b"\x00" * 32 + b";"


JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\x00" * 64
MP4 = struct.pack(">I", 24) + b"ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< >>\nendobj\n"
PNG = png(3, 2)


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("hello.txt", "hi")
    return buf.getvalue()


ZIP = zip_bytes()
TEXT = b"just some words, no magic number\n"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


# --- declared_type --------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "expected"), [
    ("image/png", "image/png"),
    ("IMAGE/PNG", "image/png"),
    ("  text/plain ; charset=utf-8", "text/plain"),
    ("application/octet-stream;foo=bar;x=y", "application/octet-stream"),
    ("image/jpg", "image/jpeg"),
    ("image/pjpeg", "image/jpeg"),
    ("audio/mp3", "audio/mpeg"),
    ("audio/x-m4a", "audio/mp4"),
    ("application/x-zip-compressed", "application/zip"),
    (DOCX, DOCX),
])
def test_declared_type_drops_parameters_and_maps_aliases(header: str, expected: str) -> None:
    assert declared_type(header) == expected


@pytest.mark.parametrize("header", [None, "", "   ", "; charset=utf-8"])
def test_declared_type_missing_is_a_bad_request(header: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        declared_type(header)
    assert type(info.value) is BadRequest
    assert (info.value.status, info.value.errcode) == (400, "M_BAD_JSON")


@pytest.mark.parametrize("header", ["png", "image/", "/png", "image/png/x", "image png",
                                    "imäge/png", "image/p\"ng", "a/" + "b" * 200])
def test_declared_type_garbage_is_an_invalid_param(header: str) -> None:
    with pytest.raises(InvalidParam) as info:
        declared_type(header)
    assert (info.value.status, info.value.errcode) == (400, "M_INVALID_PARAM")


# --- checked_type ---------------------------------------------------------------------------


@pytest.mark.parametrize(("declared", "head", "expected"), [
    ("image/png", PNG, "image/png"),
    ("image/jpeg", JPEG, "image/jpeg"),
    ("image/gif", gif(3, 2), "image/gif"),
    ("video/mp4", MP4, "video/mp4"),
    ("application/pdf", PDF, "application/pdf"),
    ("application/zip", ZIP, "application/zip"),
    # octet-stream: the bytes say what it is
    ("application/octet-stream", PNG, "image/png"),
    ("application/octet-stream", PDF, "application/pdf"),
    ("application/octet-stream", MP4, "video/mp4"),
    # a zip-based format the sniffer only knows as zip
    (DOCX, ZIP, DOCX),
    ("application/epub+zip", ZIP, "application/epub+zip"),
    # unrecognisable bytes of a kind that has no signature: taken as declared
    ("text/plain", TEXT, "text/plain"),
    ("application/octet-stream", TEXT, "application/octet-stream"),
    ("text/csv", TEXT, "text/csv"),
    # an mp4 holding only sound
    ("audio/mp4", MP4, "audio/mp4"),
])
def test_checked_type_accepts(declared: str, head: bytes, expected: str) -> None:
    assert checked_type(declared, head) == expected


@pytest.mark.parametrize(("declared", "head", "sniffed"), [
    ("image/png", JPEG, "image/jpeg"),
    ("image/jpeg", PNG, "image/png"),
    ("image/png", gif(1, 1), "image/gif"),
    ("application/pdf", PNG, "image/png"),
    ("text/plain", PDF, "application/pdf"),
    ("image/png", ZIP, "application/zip"),
    ("audio/mpeg", MP4, "video/mp4"),  # same kind family, another container
    ("application/json", ZIP, "application/zip"),  # not a zip-based format
    ("video/mp4", PNG, "image/png"),
])
def test_checked_type_refuses_a_wrong_declaration(declared: str, head: bytes,
                                                  sniffed: str) -> None:
    with pytest.raises(WrongContentType) as info:
        checked_type(declared, head)
    assert (info.value.status, info.value.errcode) == (415, "DMBRIDGE_WRONG_CONTENT_TYPE")
    assert str(info.value) == f"the content is {sniffed}, but Content-Type says {declared}"


@pytest.mark.parametrize("declared", ["image/png", "image/svg+xml", "audio/mpeg", "video/mp4"])
def test_checked_type_refuses_unrecognisable_media_kinds(declared: str) -> None:
    with pytest.raises(WrongContentType) as info:
        checked_type(declared, TEXT)
    assert declared in str(info.value)
    assert info.value.status == 415


# --- safe_filename, msgtype_for -------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    (None, None),
    ("photo.png", "photo.png"),
    ("  spaced name.txt  ", "spaced name.txt"),
    ("/etc/passwd", "passwd"),
    ("../../secret.txt", "secret.txt"),
    ("C:\\Users\\bob\\report.pdf", "report.pdf"),
    ("dir/sub\\mixed.doc", "mixed.doc"),
    ("naïve ünïcödé ñame.txt", "naïve ünïcödé ñame.txt"),
    ("x" * 255, "x" * 255),
    ("日本語.png", "日本語.png"),
    ("..hidden", "..hidden"),
])
def test_safe_filename_keeps_the_last_path_part(name: str | None, expected: str | None) -> None:
    assert safe_filename(name) == expected


@pytest.mark.parametrize("name", ["", "   ", "dir/", "a\\", "x" * 256, "bad\nname.txt",
                                  "tab\there", "nul\x00.txt", "del\x7f.txt", "\x1b[31m.txt",
                                  ".", "..", "dir/..", "a\u202egnp.exe", "x\x85y",
                                  "zero\u200bwidth.png", "line\u2028sep.txt"])
def test_safe_filename_refuses(name: str) -> None:
    with pytest.raises(InvalidParam) as info:
        safe_filename(name)
    assert "filename" in str(info.value)


@pytest.mark.parametrize(("mimetype", "msgtype"), [
    ("image/png", "m.image"), ("image/svg+xml", "m.image"), ("video/mp4", "m.video"),
    ("audio/ogg", "m.audio"), ("application/pdf", "m.file"), ("text/plain", "m.file"),
    ("application/octet-stream", "m.file"), ("imagex/png", "m.file"),
])
def test_msgtype_for(mimetype: str, msgtype: str) -> None:
    assert msgtype_for(mimetype) == msgtype


# --- MediaLinks -----------------------------------------------------------------------------

SECRET = "as-token-0123456789abcdef"
URI = "mxc://example.org/AbC_123-x"
NOW = 1_700_000_000.0


def links(ttl: float = 3600, public_url: str = "https://bridge.example/") -> MediaLinks:
    return MediaLinks(SECRET, public_url, ttl)


def params(url: str) -> tuple[str, str, str]:
    """(path, expires, sig) of a link."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, strict_parsing=True)
    assert set(query) == {"expires", "sig"}
    return parts.path, query["expires"][0], query["sig"][0]


def test_link_shape_and_check() -> None:
    media_links = links()
    link = media_links.make("sms", URI, now=NOW)
    assert link.expires_at == int((NOW + 3600) * 1000)
    assert link.url.startswith("https://bridge.example/_dmbridge/v1/networks/sms/media/"
                               "example.org/AbC_123-x?")
    path, expires, sig = params(link.url)
    assert path == "/_dmbridge/v1/networks/sms/media/example.org/AbC_123-x"
    assert expires == str(link.expires_at)
    assert len(sig) == 64 and all(c in "0123456789abcdef" for c in sig)
    media_links.check("sms", URI, expires, sig, now=NOW)
    media_links.check("sms", URI, expires, sig, now=NOW + 3599.999)
    # Another instance with the same secret (another worker, a restart) accepts it too.
    MediaLinks(SECRET, "http://elsewhere:1", 60).check("sms", URI, expires, sig, now=NOW)


def test_links_differ_by_network_media_and_time() -> None:
    media_links = links()
    one = media_links.make("sms", URI, now=NOW)
    assert media_links.make("sms", URI, now=NOW) == one
    assert params(media_links.make("chat", URI, now=NOW).url)[2] != params(one.url)[2]
    assert params(media_links.make("sms", URI + "y", now=NOW).url)[2] != params(one.url)[2]
    assert params(media_links.make("sms", URI, now=NOW + 1).url)[2] != params(one.url)[2]


def test_link_with_a_server_port() -> None:
    link = links().make("sms", "mxc://localhost:8448/abc", now=NOW)
    assert "/media/localhost:8448/abc?" in link.url


@pytest.mark.parametrize("content_uri", ["https://example.org/a", "mxc://example.org/",
                                         "mxc://example.org/a/b", "mxc://ex ample/a", ""])
def test_make_refuses_what_is_not_a_content_uri(content_uri: str) -> None:
    with pytest.raises(ValueError):
        links().make("sms", content_uri, now=NOW)


def _tampered(sig: str) -> str:
    return ("0" if sig[0] != "0" else "1") + sig[1:]


@pytest.mark.parametrize("case", ["tampered sig", "other network", "other content URI",
                                  "expired", "expires changed", "upper-case sig",
                                  "other secret"])
def test_check_refuses(case: str) -> None:
    media_links = links()
    link = media_links.make("sms", URI, now=NOW)
    _, expires, sig = params(link.url)
    network, content_uri, now = "sms", URI, NOW
    checker = media_links
    if case == "tampered sig":
        sig = _tampered(sig)
    elif case == "other network":
        network = "chat"
    elif case == "other content URI":
        content_uri = "mxc://example.org/other"
    elif case == "expired":
        now = NOW + 3600.001
    elif case == "expires changed":
        expires = str(int(expires) + 1_000_000)
    elif case == "upper-case sig":
        sig = sig.upper()
    elif case == "other secret":
        checker = MediaLinks("another-secret-0123456789", "https://bridge.example", 3600)
    with pytest.raises(Forbidden) as info:
        checker.check(network, content_uri, expires, sig, now=now)
    assert (info.value.status, info.value.errcode) == (403, "M_FORBIDDEN")
    if case == "expired":
        assert "expired" in str(info.value)
    else:
        assert "signature" in str(info.value)


@pytest.mark.parametrize(("expires", "sig"), [
    (None, "ab"), ("123", None), (None, None), ("", "ab"), ("123", ""),
    ("-5", "ab"), ("12.5", "ab"), ("soon", "ab"), ("123", "sïg"),
])
def test_check_refuses_missing_or_malformed_parameters(expires: str | None,
                                                       sig: str | None) -> None:
    with pytest.raises(Forbidden) as info:
        links().check("sms", URI, expires, sig, now=NOW)
    assert "'expires' and 'sig'" in str(info.value)


@pytest.mark.parametrize("expires", ["\u00b2", "\u0661\u0662\u0663", "9" * 16])
def test_check_refuses_non_ascii_or_absurd_expires(expires: str) -> None:
    # '²' passes str.isdigit() but not int(): it must be a 403, not a ValueError (a 500).
    with pytest.raises(Forbidden) as info:
        links().check("sms", URI, expires, "ab", now=NOW)
    assert "'expires' and 'sig'" in str(info.value)


def media_event(network: str = "sms", content_uri: Any = URI, type_: str = "message"
                ) -> dict[str, Any]:
    return {
        "type": type_, "network": network, "idempotency_key": "$e",
        "message": {"event_id": "$e", "text": "", "media": {
            "content_uri": content_uri, "name": "cat.png", "mimetype": "image/png", "size": 3,
            "width": None, "height": None, "duration_ms": None,
        }},
    }


def test_attach_adds_a_fresh_link_to_media_messages() -> None:
    media_links = links(ttl=600)
    event = media_event("chat")
    before = copy.deepcopy(event)
    assert media_links.attach(event) is event
    media = event["message"]["media"]
    path, expires, sig = params(media["url"])
    assert media["url"].startswith("https://bridge.example/_dmbridge/v1/networks/chat/media/")
    assert path.endswith("/media/example.org/AbC_123-x")
    assert media["expires_at"] == int(expires)
    media_links.check("chat", URI, expires, sig)  # valid now, for this network
    with pytest.raises(Forbidden):
        media_links.check("sms", URI, expires, sig)
    # Everything else stays as it was.
    del media["url"], media["expires_at"]
    assert event == before


@pytest.mark.parametrize("event", [
    {"type": "message", "network": "sms", "message": {"event_id": "$e", "media": None}},
    {"type": "message", "network": "sms", "message": {"event_id": "$e"}},
    {"type": "reaction", "network": "sms", "reaction": {"event_id": "$e", "key": "👍"}},
    {"type": "dm.ended", "network": "sms", "dm": {"state": "ended"}},
    {"type": "typing", "network": "sms", "typing": True},
    {"type": "message", "network": "sms", "message": "not a mapping"},
    {"type": "message", "network": "sms", "message": {"media": {"name": "no uri"}}},
    media_event(content_uri="https://example.org/not-mxc"),
    media_event(content_uri="mxc://example.org/bad/id"),
    media_event(content_uri=42),
], ids=["media null", "no media key", "reaction", "notice", "typing", "message not a dict",
        "media without uri", "not mxc", "malformed mxc", "uri not a string"])
def test_attach_leaves_other_events_untouched(event: dict[str, Any]) -> None:
    before = copy.deepcopy(event)
    assert links().attach(event) is event
    assert event == before


# --- MediaService.upload --------------------------------------------------------------------


class FakeHomeserver:
    """Takes uploads like Homeserver.upload, recording what it got."""

    def __init__(self) -> None:
        self.uploads: list[tuple[bytes, str, str | None, int]] = []

    async def upload(self, data: BinaryIO, mimetype: str, filename: str | None, size: int
                     ) -> str:
        self.uploads.append((data.read(), mimetype, filename, size))
        return f"mxc://example.org/upload{len(self.uploads)}"


def service(stores: Stores, max_bytes: int = 1000) -> tuple[MediaService, FakeHomeserver]:
    homeserver = FakeHomeserver()
    settings = SimpleNamespace(media=SimpleNamespace(max_upload_bytes=max_bytes),
                               listener=ListenerSettings())
    return MediaService(settings=cast(Any, settings), stores=stores,
                        homeserver=cast(Homeserver, homeserver), links=links()), homeserver


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def split(data: bytes, size: int) -> Iterable[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


async def test_upload_stores_an_image_with_its_dimensions(stores: Stores) -> None:
    media_service, homeserver = service(stores)
    data = png(7, 5)
    media = await media_service.upload(SMS, chunks(*split(data, 10)), content_type="image/png",
                                       length=len(data), filename="pics/red.png")
    assert media == Media(ContentURI("mxc://example.org/upload1"), "sms", "image/png", len(data),
                          "red.png", 7, 5)
    assert homeserver.uploads == [(data, "image/png", "red.png", len(data))]
    assert await stores.media.get("sms", "mxc://example.org/upload1") == media
    assert await stores.media.get("chat", "mxc://example.org/upload1") is None  # not theirs


async def test_upload_of_a_gif_and_a_sniffed_octet_stream(stores: Stores) -> None:
    media_service, homeserver = service(stores)
    data = gif(640, 480)
    media = await media_service.upload(CHAT, chunks(data),
                                       content_type="application/octet-stream; x=1",
                                       length=None, filename=None)
    assert (media.mimetype, media.width, media.height, media.filename) == (
        "image/gif", 640, 480, None)
    assert homeserver.uploads == [(data, "image/gif", None, len(data))]
    assert await stores.media.get("chat", media.content_uri) == media


async def test_upload_of_a_file_has_no_dimensions(stores: Stores) -> None:
    media_service, homeserver = service(stores)
    media = await media_service.upload(SMS, chunks(b"a,b\n", b"1,2\n"), content_type="text/csv",
                                       length=8, filename="t.csv")
    assert (media.mimetype, media.size, media.width, media.height) == ("text/csv", 8, None, None)
    assert homeserver.uploads == [(b"a,b\n1,2\n", "text/csv", "t.csv", 8)]


async def test_upload_of_an_image_with_unreadable_dimensions(stores: Stores) -> None:
    media_service, _ = service(stores)
    media = await media_service.upload(SMS, chunks(JPEG), content_type="image/jpeg",
                                       length=None, filename="x.jpg")
    assert (media.mimetype, media.width, media.height) == ("image/jpeg", None, None)
    assert await stores.media.get("sms", media.content_uri) == media


async def test_upload_limit_counts_streamed_chunks(stores: Stores) -> None:
    media_service, homeserver = service(stores, max_bytes=100)
    exact = TEXT * 3 + b"x"
    exact = exact[:100]
    media = await media_service.upload(SMS, chunks(*split(exact, 33)), content_type="text/plain",
                                       length=None, filename="exact.txt")
    assert media.size == 100
    over = TEXT * 4
    assert len(over) > 100
    with pytest.raises(TooLarge) as info:
        # No length given, or a lying one: the bytes themselves are counted.
        await media_service.upload(SMS, chunks(*split(over, 40)), content_type="text/plain",
                                   length=10, filename="big.txt")
    assert (info.value.status, info.value.errcode) == (413, "M_TOO_LARGE")
    assert "100" in str(info.value)
    assert [u[2] for u in homeserver.uploads] == ["exact.txt"]
    assert await stores.db.fetchval("SELECT COUNT(*) FROM media") == 1


async def test_upload_refuses_a_too_big_length_before_reading(stores: Stores) -> None:
    media_service, homeserver = service(stores, max_bytes=100)
    read = []

    async def body() -> AsyncIterator[bytes]:
        read.append(True)
        yield b"x"

    with pytest.raises(TooLarge) as info:
        await media_service.upload(SMS, body(), content_type="text/plain", length=101,
                                   filename=None)
    assert "101" in str(info.value) and "media.max_upload_bytes" in str(info.value)
    assert read == []
    assert homeserver.uploads == []


@pytest.mark.parametrize(("content_type", "data", "filename", "error"), [
    ("text/plain", b"", None, BadRequest),
    (None, PNG, None, BadRequest),
    ("not a type", PNG, None, InvalidParam),
    ("image/png", PNG, "bad\nname", InvalidParam),
    ("image/jpeg", PNG, None, WrongContentType),
    ("image/png", TEXT, None, WrongContentType),
], ids=["empty", "no content type", "garbled content type", "bad filename", "wrong type",
        "unrecognisable image"])
async def test_refused_uploads_store_and_upload_nothing(
    stores: Stores, content_type: str | None, data: bytes, filename: str | None,
    error: type[Exception],
) -> None:
    media_service, homeserver = service(stores)
    with pytest.raises(error):
        await media_service.upload(SMS, chunks(data) if data else chunks(),
                                   content_type=content_type, length=len(data),
                                   filename=filename)
    assert homeserver.uploads == []
    assert await stores.db.fetchval("SELECT COUNT(*) FROM media") == 0


async def test_empty_chunks_are_an_empty_upload(stores: Stores) -> None:
    media_service, homeserver = service(stores)
    with pytest.raises(BadRequest) as info:
        await media_service.upload(SMS, chunks(b"", b""), content_type="text/plain",
                                   length=None, filename=None)
    assert "empty" in str(info.value)
    assert homeserver.uploads == []


# --- forms, animated PNGs, Opus, dot-segment servers ----------------------------------------


def test_a_multipart_form_is_refused_with_what_to_send_instead() -> None:
    with pytest.raises(InvalidParam) as info:
        declared_type("multipart/form-data; boundary=xyz")
    assert "not a multipart form" in str(info.value)


def test_an_animated_png_and_opus_audio_keep_their_declared_type() -> None:
    apng = png(1, 1)[:33] + b"\x00\x00\x00\x08acTL" + b"\x00" * 12 + png(1, 1)[33:]
    assert checked_type("image/png", apng) == "image/png"
    ogg = b"OggS\x00\x02" + b"\x00" * 22 + b"\x13OpusHead" + b"\x00" * 40
    assert checked_type("audio/opus", ogg) == "audio/opus"


@pytest.mark.parametrize("uri", ["mxc://../config", "mxc://./x"])
def test_a_dot_segment_server_is_no_content_uri(uri: str) -> None:
    links = MediaLinks("secret-0123456789abcdef", "http://127.0.0.1:1", 60)
    with pytest.raises(ValueError, match="not a content URI"):
        links.make("sms", uri)
