"""Webhook signatures (what the bridge sends and what receivers check) and Retry-After."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from dmbridge import signing
from dmbridge.db.outbox import OutboxItem
from dmbridge.webhook import body_of, retry_after

SECRET = "webhook-secret-0123456789"
BODY = b'{"id":1,"type":"message","text":"h\xc3\xa9llo"}'
NOW = 1_700_000_000


def signed(secret: str = SECRET, body: bytes = BODY, now: float = NOW) -> tuple[str, str]:
    headers = signing.sign(secret, body, now=now)
    return headers[signing.TIMESTAMP_HEADER], headers[signing.SIGNATURE_HEADER]


# --- signing --------------------------------------------------------------------------------


def test_sign_produces_the_documented_headers() -> None:
    headers = signing.sign(SECRET, BODY, now=NOW + 0.9)
    assert set(headers) == {"X-Dmbridge-Timestamp", "X-Dmbridge-Signature"}
    assert headers["X-Dmbridge-Timestamp"] == str(NOW)  # whole seconds
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert headers["X-Dmbridge-Signature"] == f"sha256={expected}"


def test_sign_then_verify() -> None:
    ts, sig = signed()
    assert signing.verify(SECRET, ts, sig, BODY, now=NOW)
    assert signing.verify(SECRET, ts, sig, BODY, now=NOW + 300)  # at the edge of the window
    assert signing.verify(SECRET, ts, sig, BODY, now=NOW - 300)  # a receiver's clock behind


@pytest.mark.parametrize(
    ("secret", "timestamp", "sig", "body", "now"),
    [
        ("another-secret-0123456789", None, None, BODY, NOW),  # wrong secret
        (SECRET, None, None, BODY + b" ", NOW),  # body changed
        (SECRET, None, None, BODY.replace(b"1", b"2"), NOW),
        (SECRET, None, None, BODY, NOW + 301),  # replayed too late
        (SECRET, None, None, BODY, NOW - 301),  # from too far in the future
        (SECRET, str(NOW + 1), None, BODY, NOW),  # timestamp changed, signature kept
        (SECRET, None, "", BODY, NOW),
        (SECRET, None, "sha256=", BODY, NOW),
        (SECRET, None, "STRIP", BODY, NOW),  # the bare hex, without "sha256="
        (SECRET, None, "UPPER", BODY, NOW),  # the hex in capitals
    ],
)
def test_verify_rejects(secret: str, timestamp: str | None, sig: str | None, body: bytes,
                        now: int) -> None:
    good_ts, good_sig = signed()
    if sig == "STRIP":
        sig = good_sig.removeprefix("sha256=")
    elif sig == "UPPER":
        sig = "sha256=" + good_sig.removeprefix("sha256=").upper()
    assert not signing.verify(secret, timestamp or good_ts, good_sig if sig is None else sig,
                              body, now=now)


@pytest.mark.parametrize("timestamp", ["", "abc", "1.7e9", "nan", "0x10", "9" * 5000, "\udcff"])
def test_verify_rejects_a_timestamp_that_is_not_a_number(timestamp: str) -> None:
    _, sig = signed()
    assert signing.verify(SECRET, timestamp, sig, BODY, now=NOW) is False


@pytest.mark.parametrize(
    "sig",
    [
        "sha256=é" + "0" * 63,  # non-ASCII
        "sha256=" + "\u0663" * 64,  # non-ASCII digits
        # A byte that is not UTF-8, as aiohttp hands it over (decoded with surrogateescape).
        b"sha256=\xff".decode("utf-8", "surrogateescape"),
    ],
)
def test_verify_rejects_a_non_ascii_signature_without_raising(sig: str) -> None:
    ts, _ = signed()
    assert signing.verify(SECRET, ts, sig, BODY, now=NOW) is False


def test_body_of_is_the_compact_json_of_the_event() -> None:
    item = OutboxItem(
        id=7, network="sms", remote_id="+1", user_id="@a:x", type="message",
        idempotency_key="$e", payload=json.dumps({"type": "message", "text": "héllo"}),
        state="pending", attempts=0, next_attempt_at=0, last_error=None, created_at=0,
        queued_at=0, finished_at=None,
    )
    body = body_of(item)
    assert body == '{"id":7,"type":"message","text":"héllo"}'.encode()
    ts, sig = signed(body=body)
    assert signing.verify(SECRET, ts, sig, body, now=NOW)


# --- Retry-After ----------------------------------------------------------------------------


def http_date(when: datetime) -> str:
    return format_datetime(when, usegmt=True)


@pytest.mark.parametrize(("value", "seconds"), [("120", 120.0), ("0", 0.0), (" 5 ", 5.0),
                                                ("007", 7.0)])
def test_retry_after_in_seconds(value: str, seconds: float) -> None:
    assert retry_after(value, now=NOW) == seconds


def test_retry_after_as_an_http_date() -> None:
    now = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after(http_date(now + timedelta(seconds=90)), now=now.timestamp()) == 90.0
    assert retry_after(http_date(now - timedelta(hours=1)), now=now.timestamp()) == 0.0
    assert retry_after(http_date(now), now=now.timestamp()) == 0.0
    # The obsolete but still allowed forms of an HTTP date.
    assert retry_after("Saturday, 01-Mar-25 12:00:30 GMT", now=now.timestamp()) == 30.0


def test_retry_after_without_now_uses_the_clock() -> None:
    later = datetime.now(UTC) + timedelta(seconds=60)
    value = retry_after(http_date(later))
    assert value is not None and 55 <= value <= 61


@pytest.mark.parametrize(
    "value",
    [
        None, "", "   ", "soon", "-5", "1.5", "5s", "1e3", "+5",
        "Mon, 32 Jan 2020 00:00:00 GMT",  # no such day
        "Wed, 21 Oct 99999 07:28:00 GMT",  # no such year
        "Wed, 21 Oct 2015 25:28:00 GMT",  # no such hour
        "Wed, 21 Oct 2015 07:28:00 -0000",  # a date without a time zone
        "Wed, 21 Oct 2015 07:28:00",
        "\udcff",
        "²",  # str.isdigit() says yes, float() says no
    ],
)
def test_unusable_retry_after_is_none(value: str | None) -> None:
    assert retry_after(value, now=NOW) is None


def test_huge_retry_after_stays_a_finite_number() -> None:
    # An absurd value must not turn into inf: the bridge computes int(delay * 1000) from it.
    value = retry_after("9" * 400, now=NOW)
    assert value is None or value < 10**12
