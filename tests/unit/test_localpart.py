"""Remote IDs escape reversibly into localparts, and only canonical localparts unescape."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dmbridge.localpart import LocalpartError, escape, is_valid_localpart, unescape

# Plain text plus the characters the escaping treats specially, so they show up often.
REMOTE_IDS = st.text() | st.text(alphabet=st.sampled_from("aZ_=+ /.-9é€😀\x00"))


@given(REMOTE_IDS)
@example("+15551234567")
@example("Alice_B")
@example("a=b")
@example("_")
@example("Ünïcödé 😀")
def test_round_trip(remote_id: str) -> None:
    escaped = escape(remote_id)
    assert unescape(escaped) == remote_id
    if remote_id:
        assert is_valid_localpart(escaped), escaped
    else:
        assert escaped == ""


@given(st.lists(REMOTE_IDS, min_size=2, max_size=20, unique=True))
def test_escape_is_injective(remote_ids: list[str]) -> None:
    escaped = [escape(r) for r in remote_ids]
    assert len(set(escaped)) == len(remote_ids)


@pytest.mark.parametrize(
    ("remote_id", "localpart"),
    [
        ("+15551234567", "=2b15551234567"),
        ("Alice_B", "_alice___b"),  # _a lice __ _b
        ("a=b", "a=3db"),
        ("plain.id-1/x", "plain.id-1/x"),
        ("a b", "a=20b"),
        ("é", "=c3=a9"),
    ],
)
def test_known_examples(remote_id: str, localpart: str) -> None:
    assert escape(remote_id) == localpart
    assert unescape(localpart) == remote_id


@pytest.mark.parametrize(
    "localpart",
    [
        "_A",  # upper-case letter after the escape character
        "_1",  # '_' must be followed by '_' or a lower-case letter
        "_",  # dangling escape
        "=zz",  # not hex
        "=4",  # truncated hex
        "=4A",  # upper-case hex is not canonical
        "=41",  # 'A' is canonically '_a'
        "=61",  # 'a' is canonically 'a'
        "=5f",  # '_' is canonically '__'
        "A",  # upper case is never plain
        "a b",  # space is never plain
        "é",  # non-ASCII is never plain
        "=ff",  # escaped bytes that are not UTF-8
        "=c3",  # truncated UTF-8 sequence
    ],
)
def test_unescape_refuses_non_canonical(localpart: str) -> None:
    with pytest.raises(LocalpartError):
        unescape(localpart)


@given(st.text(alphabet=st.sampled_from("abAZ_=09f+ .")))
def test_unescape_accepts_exactly_what_escape_produces(localpart: str) -> None:
    try:
        remote_id = unescape(localpart)
    except LocalpartError:
        return
    assert escape(remote_id) == localpart
