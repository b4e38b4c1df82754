"""Media both ways and ghost avatars, as the human's client and the platform see them."""

from __future__ import annotations

import json
import random
import struct
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nio import ProfileGetResponse, UploadResponse

from dmbridge.bridge import Bridge
from tests.integration.conftest import BridgeFactory, Platform, accept_dm, wait_for
from tests.support.feed import Feed
from tests.support.matrix import Human
from tests.support.settings import CHAT_TOKEN, SMS_TOKEN

PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
AVATAR_PROFILE = "PUT /_matrix/client/v3/profile/{id}/avatar_url"
NAME_PROFILE = "PUT /_matrix/client/v3/profile/{id}/displayname"


def png(width: int, height: int, rgb: bytes = b"\xff\x00\x00") -> bytes:
    """A real, decodable PNG of one colour."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    rows = b"".join(b"\0" + rgb * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


async def _upload(platform: Platform, data: Any, content_type: str | None, *,
                  filename: str | None = None, network: str = "chat", token: str = CHAT_TOKEN,
                  ) -> tuple[int, dict[str, Any]]:
    """POST .../media as a platform would; ``data`` may be bytes or an async generator."""
    headers = {"Authorization": f"Bearer {token}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    async with platform.session.post(
        f"{platform.base}/networks/{network}/media", data=data, headers=headers,
        params={"filename": filename} if filename else None,
        skip_auto_headers=["Content-Type"],
    ) as resp:
        return resp.status, await resp.json(content_type=None)


async def _uploaded(platform: Platform, data: bytes, content_type: str,
                    filename: str | None = None, **kwargs: Any) -> dict[str, Any]:
    status, body = await _upload(platform, data, content_type, filename=filename, **kwargs)
    assert status == 201, body
    return body


async def _fetch(platform: Platform, url: str, token: str | None = CHAT_TOKEN
                 ) -> tuple[int, dict[str, str], bytes]:
    """GET a media link as the platform: status, headers, body."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with platform.session.get(url, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def _refused(platform: Platform, url: str, token: str | None = CHAT_TOKEN
                   ) -> tuple[int, str]:
    status, _, body = await _fetch(platform, url, token)
    return status, json.loads(body)["errcode"]


async def _download_as(human: Human, content_uri: str) -> tuple[int, str, bytes]:
    """The human fetches media through the homeserver's authenticated media API."""
    server, media_id = content_uri.removeprefix("mxc://").split("/")
    resp = await human.client.send(
        "GET", f"/_matrix/client/v1/media/download/{server}/{media_id}",
        headers={"Authorization": f"Bearer {human.client.access_token}"},
    )
    return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


async def _human_upload(human: Human, data: bytes, content_type: str, filename: str) -> str:
    resp, _ = await human.client.upload(lambda *_: data, content_type=content_type,
                                        filename=filename, filesize=len(data))
    assert isinstance(resp, UploadResponse), resp
    return str(resp.content_uri)


async def _send(platform: Platform, contact: str, user_id: str, message_id: str | None = None,
                **body: Any) -> tuple[int, dict[str, Any]]:
    return await platform.send("chat", CHAT_TOKEN, message_id or uuid.uuid4().hex,
                               sender=contact, recipient=user_id, **body)


async def _sent(platform: Platform, contact: str, user_id: str, **body: Any) -> dict[str, Any]:
    status, sent = await _send(platform, contact, user_id, **body)
    assert status == 200, sent
    return sent


def _with_query(url: str, **changes: str) -> str:
    """The same link with some query parameters replaced."""
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()


# --- platform -> Matrix -------------------------------------------------------------------------


async def test_platform_media_reaches_the_client_intact(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    """Images (with and without a caption) and files, as the human's client shows them, and
    the very same bytes back from the homeserver."""
    human = await new_human()
    contact = f"m{uuid.uuid4().hex[:10]}"
    red = png(3, 2)
    blue = png(5, 4, b"\x00\x00\xff")
    notes = b"shopping: eggs, flour\n"

    image = await _uploaded(platform, red, "image/png", "red.png")
    assert image["content_uri"].startswith("mxc://localhost/")
    assert {k: v for k, v in image.items() if k != "content_uri"} == {
        "mimetype": "image/png", "size": len(red), "filename": "red.png", "width": 3,
        "height": 2}
    pdf = await _uploaded(platform, PDF, "application/pdf", "../../report.pdf")
    assert (pdf["mimetype"], pdf["size"], pdf["filename"], pdf["width"], pdf["height"]) == (
        "application/pdf", len(PDF), "report.pdf", None, None)
    text = await _uploaded(platform, notes, "text/plain; charset=utf-8", "notes.txt")
    assert (text["mimetype"], text["size"], text["width"]) == ("text/plain", len(notes), None)
    # A platform that does not know what it has: the bytes say it is a PNG.
    unknown = await _uploaded(platform, blue, "application/octet-stream")
    assert (unknown["mimetype"], unknown["filename"], unknown["width"], unknown["height"]) == (
        "image/png", None, 5, 4)

    room_id = (await _sent(platform, contact, human.user_id, media=image["content_uri"]))[
        "room_id"]
    await accept_dm(human, room_id, None)
    await _sent(platform, contact, human.user_id, media=image["content_uri"],
                text="a red pixel or six")
    await _sent(platform, contact, human.user_id, media=image["content_uri"],
                html="<b>red</b> pixels")
    await _sent(platform, contact, human.user_id, media=pdf["content_uri"])
    await _sent(platform, contact, human.user_id, media=text["content_uri"], text="the list")
    await _sent(platform, contact, human.user_id, media=unknown["content_uri"])

    contents = [m["content"] for m in await human.wait_messages(room_id, 6)]
    red_info = {"mimetype": "image/png", "size": len(red), "w": 3, "h": 2}
    assert contents == [
        {"msgtype": "m.image", "body": "red.png", "filename": "red.png",
         "url": image["content_uri"], "info": red_info},
        {"msgtype": "m.image", "body": "a red pixel or six", "filename": "red.png",
         "url": image["content_uri"], "info": red_info},
        {"msgtype": "m.image", "body": "red pixels", "format": "org.matrix.custom.html",
         "formatted_body": "<b>red</b> pixels", "filename": "red.png",
         "url": image["content_uri"], "info": red_info},
        {"msgtype": "m.file", "body": "report.pdf", "filename": "report.pdf",
         "url": pdf["content_uri"], "info": {"mimetype": "application/pdf", "size": len(PDF)}},
        {"msgtype": "m.file", "body": "the list", "filename": "notes.txt",
         "url": text["content_uri"], "info": {"mimetype": "text/plain", "size": len(notes)}},
        {"msgtype": "m.image", "body": "image.png", "filename": "image.png",
         "url": unknown["content_uri"],
         "info": {"mimetype": "image/png", "size": len(blue), "w": 5, "h": 4}},
    ]

    for uploaded, data in ((image, red), (pdf, PDF), (text, notes), (unknown, blue)):
        status, content_type, got = await _download_as(human, uploaded["content_uri"])
        assert status == 200, got
        assert got == data
        assert content_type.split(";")[0] == uploaded["mimetype"]


# --- Matrix -> platform -------------------------------------------------------------------------


async def test_matrix_media_reaches_the_platform_through_signed_links(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    """The platform gets the human's image with a link only it can use, and only for a while."""
    human = await new_human()
    contact = f"m{uuid.uuid4().hex[:10]}"
    room_id = (await _sent(platform, contact, human.user_id, text="send me a photo"))["room_id"]
    await accept_dm(human, room_id, bridge)
    feed = Feed(platform)

    photo = png(3, 2, b"\x00\xff\x00")
    photo_uri = await _human_upload(human, photo, "image/png", "me.png")
    await human.client.room_send(room_id, "m.room.message", {
        "msgtype": "m.image", "body": "me.png", "filename": "me.png", "url": photo_uri,
        "info": {"mimetype": "image/png", "size": len(photo), "w": 3, "h": 2}})
    event = await feed.expect("message", room_id=room_id)
    message = event["message"]
    assert (message["msgtype"], message["text"], message["html"]) == ("m.image", "", None)
    media = message["media"]
    url, expires_at = media.pop("url"), media.pop("expires_at")
    assert media == {"content_uri": photo_uri, "name": "me.png", "mimetype": "image/png",
                     "size": len(photo), "width": 3, "height": 2, "duration_ms": None}
    server, media_id = photo_uri.removeprefix("mxc://").split("/")
    assert url.startswith(f"{bridge.settings.media.public_url.rstrip('/')}/_dmbridge/v1/"
                          f"networks/chat/media/{server}/{media_id}?")
    assert abs(expires_at - (time.time() + bridge.settings.media.link_ttl) * 1000) < 60_000

    status, headers, got = await _fetch(platform, url)
    assert status == 200, got
    assert got == photo
    assert headers["Content-Type"] == "image/png"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "private, no-store"
    assert headers["Content-Length"] == str(len(photo))
    # HEAD is not served: a body after a HEAD answer would break the client's connection.
    async with platform.session.head(url, headers={"Authorization": f"Bearer {CHAT_TOKEN}"}
                                     ) as resp:
        assert resp.status == 405
    status, _, again = await _fetch(platform, url)  # the connection pool is still sound
    assert (status, again) == (200, photo)

    # A caption: the platform gets it as the text, the file name as the media's name.
    other = png(4, 4, b"\x00\x00\xff")
    other_uri = await _human_upload(human, other, "image/png", "x.png")
    await human.client.room_send(room_id, "m.room.message", {
        "msgtype": "m.image", "body": "look at this", "filename": "x.png", "url": other_uri,
        "info": {"mimetype": "image/png", "size": len(other), "w": 4, "h": 4}})
    captioned = (await feed.expect("message", room_id=room_id, text="look at this"))["message"]
    assert (captioned["msgtype"], captioned["media"]["name"], captioned["media"]["content_uri"]) \
        == ("m.image", "x.png", other_uri)
    status, _, got = await _fetch(platform, captioned["media"]["url"])
    assert (status, got) == (200, other)

    # A sticker: its body describes it, so that is the text the platform gets.
    await human.client.room_send(room_id, "m.sticker", {
        "body": "a green square", "url": photo_uri,
        "info": {"mimetype": "image/png", "size": len(photo), "w": 3, "h": 2}})
    sticker = (await feed.expect("message", room_id=room_id, text="a green square"))["message"]
    assert (sticker["msgtype"], sticker["media"]["content_uri"], sticker["media"]["name"]) == (
        "m.sticker", photo_uri, None)

    # Who may use the link, and which links are refused.
    assert await _refused(platform, url, token=None) == (401, "M_MISSING_TOKEN")
    assert await _refused(platform, url, token=SMS_TOKEN) == (403, "M_FORBIDDEN")
    sms_path = url.replace("/networks/chat/", "/networks/sms/")
    assert await _refused(platform, sms_path, token=SMS_TOKEN) == (403, "M_FORBIDDEN")
    sig = parse_qs(urlsplit(url).query)["sig"][0]
    tampered = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    assert await _refused(platform, _with_query(url, sig=tampered)) == (403, "M_FORBIDDEN")
    other_query = parse_qs(urlsplit(captioned["media"]["url"]).query)
    assert await _refused(platform, _with_query(
        url, sig=other_query["sig"][0], expires=other_query["expires"][0])) == (403, "M_FORBIDDEN")
    later = str(int(parse_qs(urlsplit(url).query)["expires"][0]) + 86_400_000)
    assert await _refused(platform, _with_query(url, expires=later)) == (403, "M_FORBIDDEN")
    bare = url.split("?")[0]
    assert await _refused(platform, bare) == (403, "M_FORBIDDEN")
    expired = bridge.links.make("chat", photo_uri, now=time.time() - 10 * 86400)
    assert expired.expires_at < time.time() * 1000
    assert await _refused(platform, expired.url) == (403, "M_FORBIDDEN")
    # A link the bridge made, for media the homeserver does not have.
    missing = bridge.links.make("chat", f"mxc://{server}/NoSuchMediaHere")
    assert await _refused(platform, missing.url) == (404, "M_NOT_FOUND")
    # The same link, still valid, keeps working after all that.
    status, _, got = await _fetch(platform, url)
    assert (status, got) == (200, photo)


# --- hostile uploads ----------------------------------------------------------------------------


async def _chunks(data: bytes, size: int = 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def test_hostile_uploads_are_refused_before_the_homeserver(
    start_bridge: BridgeFactory, platform: Platform, new_human
) -> None:
    """Lies about the type, oversized or empty bodies, and media the network does not own."""
    bridge = await start_bridge(**{"media.max_upload_bytes": 2048})
    uploads = "POST /_matrix/media/v3/upload"
    stored = bridge.requests.by_endpoint[uploads]

    gif = b"GIF89a\x02\x00\x02\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04" + b"\0" * 40
    status, err = await _upload(platform, gif, "image/png", filename="cat.png")
    assert (status, err) == (415, {
        "errcode": "DMBRIDGE_WRONG_CONTENT_TYPE",
        "error": "the content is image/gif, but Content-Type says image/png"})
    noise = random.Random(7).randbytes(600)
    status, err = await _upload(platform, noise, "image/jpeg", filename="cat.jpg")
    assert (status, err["errcode"]) == (415, "DMBRIDGE_WRONG_CONTENT_TYPE"), err
    status, err = await _upload(platform, png(2, 2), "application/pdf")
    assert (status, err["errcode"]) == (415, "DMBRIDGE_WRONG_CONTENT_TYPE"), err

    # The limit, with an honest Content-Length and with a streamed (chunked) body.
    status, body = await _upload(platform, b"a" * 2048, "text/plain")
    assert (status, body["size"]) == (201, 2048), body
    status, err = await _upload(platform, b"a" * 2049, "text/plain")
    assert (status, err["errcode"]) == (413, "M_TOO_LARGE"), err
    status, err = await _upload(platform, b"a" * 50_000, "text/plain")
    assert (status, err["errcode"]) == (413, "M_TOO_LARGE"), err
    status, body = await _upload(platform, _chunks(b"b" * 2000), "text/plain")
    assert (status, body["size"]) == (201, 2000), body
    status, err = await _upload(platform, _chunks(b"c" * 5000), "text/plain")
    assert (status, err["errcode"]) == (413, "M_TOO_LARGE"), err

    # No type, a garbled type, nothing at all, no token.
    status, err = await _upload(platform, b"hello", None)
    assert (status, err["errcode"]) == (400, "M_BAD_JSON"), err
    status, err = await _upload(platform, b"hello", "just some text")
    assert (status, err["errcode"]) == (400, "M_INVALID_PARAM"), err
    status, err = await _upload(platform, b"", "image/png")
    assert (status, err["errcode"]) == (400, "M_BAD_JSON"), err
    status, err = await _upload(platform, b"", "text/plain")
    assert (status, err["errcode"]) == (400, "M_BAD_JSON"), err
    status, err = await _upload(platform, png(1, 1), "image/png", token="wrong-token")
    assert (status, err["errcode"]) == (401, "M_UNKNOWN_TOKEN"), err
    status, err = await _upload(platform, png(1, 1), "image/png", token=SMS_TOKEN)
    assert (status, err["errcode"]) == (403, "M_FORBIDDEN"), err
    # Only what was accepted was stored on the homeserver.
    assert bridge.requests.by_endpoint[uploads] == stored + 2

    # Media the chat network did not upload cannot be sent by it.
    human = await new_human()
    contact = f"h{uuid.uuid4().hex[:10]}"
    room_id = (await _sent(platform, contact, human.user_id, text="before"))["room_id"]
    sms_media = await _uploaded(platform, png(2, 1), "image/png", "sms.png", network="sms",
                                token=SMS_TOKEN)
    own = await _uploaded(platform, png(2, 1), "image/png", "own.png")
    for media, expected in ((sms_media["content_uri"], (404, "M_NOT_FOUND")),
                            ("mxc://localhost/MadeUpMediaID", (404, "M_NOT_FOUND")),
                            ("mxc://elsewhere.example/abc", (404, "M_NOT_FOUND")),
                            ("https://example.com/cat.png", (400, "M_INVALID_PARAM"))):
        status, err = await _send(platform, contact, human.user_id, media=media, text="x")
        assert (status, err["errcode"]) == expected, (media, err)
    status, err = await _send(platform, contact, human.user_id, media=own["content_uri"],
                              msgtype="notice")
    assert (status, err["errcode"]) == (400, "M_INVALID_PARAM"), err
    await _sent(platform, contact, human.user_id, text="after")
    await accept_dm(human, room_id, None)
    bodies = [m["content"]["body"] for m in await human.wait_messages(room_id, 2)]
    assert bodies == ["before", "after"]


# --- ghost avatars ------------------------------------------------------------------------------


async def _profile(human: Human, user_id: str) -> tuple[str | None, str | None]:
    resp = await human.client.get_profile(user_id)
    assert isinstance(resp, ProfileGetResponse), resp
    return resp.displayname, resp.avatar_url


async def test_ghost_avatar_and_name_are_set_only_when_they_change(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    """The human sees the contact's picture and name; repeating them costs no request."""
    human = await new_human()
    contact = f"a{uuid.uuid4().hex[:10]}"
    ghost = bridge.settings.networks.get("chat").ghost_user_id(contact)
    first = await _uploaded(platform, png(8, 8, b"\x10\x20\x30"), "image/png", "ada.png")
    second = await _uploaded(platform, png(8, 8, b"\x30\x20\x10"), "image/png", "ada2.png")
    doc = await _uploaded(platform, b"not a picture\n", "text/plain", "ada.txt")
    sms_pic = await _uploaded(platform, png(8, 8), "image/png", "sms.png", network="sms",
                              token=SMS_TOKEN)

    room_id = (await _sent(platform, contact, human.user_id, text="hello", sender_name="Ada",
                           sender_avatar=first["content_uri"]))["room_id"]
    await accept_dm(human, room_id, bridge)
    assert await _profile(human, ghost) == ("Ada (Chat)", first["content_uri"])
    member = await human.member_content(room_id, ghost)
    assert member is not None
    assert (member["displayname"], member["avatar_url"]) == ("Ada (Chat)", first["content_uri"])

    def counts() -> tuple[int, int]:
        return (bridge.requests.by_endpoint[AVATAR_PROFILE],
                bridge.requests.by_endpoint[NAME_PROFILE])

    before = counts()
    assert before == (1, 1), bridge.requests.by_endpoint
    await _sent(platform, contact, human.user_id, text="same me", sender_name="Ada",
                sender_avatar=first["content_uri"])
    await _sent(platform, contact, human.user_id, text="no profile given")
    assert counts() == before

    # A new picture: exactly one avatar request, and the human sees it.
    await _sent(platform, contact, human.user_id, text="new look", sender_name="Ada",
                sender_avatar=second["content_uri"])
    assert counts() == (before[0] + 1, before[1])
    assert await _profile(human, ghost) == ("Ada (Chat)", second["content_uri"])

    async def member_avatar_is_second() -> bool:
        content = await human.member_content(room_id, ghost)
        return content is not None and content.get("avatar_url") == second["content_uri"]

    await wait_for(member_avatar_is_second, what="the ghost's member event to show the avatar")

    # Avatars that are not images, or not this network's, are refused and send nothing.
    for avatar, expected in ((doc["content_uri"], (400, "M_INVALID_PARAM")),
                             (sms_pic["content_uri"], (404, "M_NOT_FOUND")),
                             ("mxc://localhost/NoSuchAvatar", (404, "M_NOT_FOUND")),
                             ("https://example.com/a.png", (400, "M_INVALID_PARAM"))):
        status, err = await _send(platform, contact, human.user_id, text="refused",
                                  sender_avatar=avatar)
        assert (status, err["errcode"]) == expected, (avatar, err)
    status, err = await platform.call("POST", "/networks/chat/dms", CHAT_TOKEN, json={
        "sender": contact, "recipient": human.user_id, "sender_avatar": doc["content_uri"]})
    assert (status, err["errcode"]) == (400, "M_INVALID_PARAM"), err
    assert counts() == (before[0] + 1, before[1])
    assert await _profile(human, ghost) == ("Ada (Chat)", second["content_uri"])

    # "" takes the picture away.
    await _sent(platform, contact, human.user_id, text="camera shy", sender_avatar="")
    assert counts() == (before[0] + 2, before[1])
    assert await _profile(human, ghost) == ("Ada (Chat)", None)
    bodies = [m["content"]["body"] for m in await human.wait_messages(room_id, 5)]
    assert bodies == ["hello", "same me", "no profile given", "new look", "camera shy"]


# --- garbled links and refused avatars change nothing --------------------------------------


async def test_garbled_link_expiry_is_refused_not_a_crash(
    bridge: Bridge, platform: Platform
) -> None:
    link = bridge.links.make("chat", "mxc://localhost/SomeMedia")
    for expires in ("%C2%B2", "9" * 5000):  # "²" passes str.isdigit(), int() refuses it
        assert await _refused(platform, _with_query(link.url, expires=expires)) == (
            403, "M_FORBIDDEN"), expires


async def test_refused_avatar_leaves_the_profile_alone(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    human = await new_human()
    contact = f"r{uuid.uuid4().hex[:10]}"
    ghost = bridge.settings.networks.get("chat").ghost_user_id(contact)
    doc = await _uploaded(platform, b"not a picture\n", "text/plain", "me.txt")
    await _sent(platform, contact, human.user_id, text="hello", sender_name="Ada")
    status, err = await _send(platform, contact, human.user_id, text="x", sender_name="Bob",
                              sender_avatar=doc["content_uri"])
    assert (status, err["errcode"]) == (400, "M_INVALID_PARAM"), err
    assert await _profile(human, ghost) == ("Ada (Chat)", None)


async def test_profile_endpoint_sets_name_and_avatar_only_on_change(
    bridge: Bridge, platform: Platform, new_human
) -> None:
    """PUT .../ghosts/{remote_id}/profile: what the human sees, and no request when unchanged."""
    human = await new_human()
    contact = f"p{uuid.uuid4().hex[:10]}"
    ghost = bridge.settings.networks.get("chat").ghost_user_id(contact)
    picture = await _uploaded(platform, png(2, 2), "image/png", "p.png")
    doc = await _uploaded(platform, b"not a picture\n", "text/plain", "p.txt")
    path = f"/networks/chat/ghosts/{contact}/profile"

    # A refused avatar is refused before the ghost even exists.
    status, err = await platform.call("PUT", path, CHAT_TOKEN,
                                      json={"name": "Pat", "avatar": doc["content_uri"]})
    assert (status, err["errcode"]) == (400, "M_INVALID_PARAM"), err
    assert await bridge.stores.ghosts.get(ghost) is None

    status, body = await platform.call("PUT", path, CHAT_TOKEN,
                                       json={"name": "Pat", "avatar": picture["content_uri"]})
    assert status == 200, body
    assert body == {"ghost_id": ghost, "displayname": "Pat (Chat)",
                    "avatar_url": picture["content_uri"]}
    assert await _profile(human, ghost) == ("Pat (Chat)", picture["content_uri"])

    before = bridge.requests.total
    status, again = await platform.call("PUT", path, CHAT_TOKEN,
                                        json={"name": "Pat", "avatar": picture["content_uri"]})
    assert (status, again) == (200, body)
    assert bridge.requests.total == before  # nothing changed: no homeserver request

    status, cleared = await platform.call("PUT", path, CHAT_TOKEN, json={"avatar": ""})
    assert status == 200 and cleared["avatar_url"] is None, cleared
    assert await _profile(human, ghost) == ("Pat (Chat)", None)

    status, err = await platform.call("PUT", "/networks/chat/ghosts/bad id!/profile",
                                      CHAT_TOKEN, json={"name": "x"})
    assert (status, err["errcode"]) == (400, "DMBRIDGE_INVALID_REMOTE_ID"), err
