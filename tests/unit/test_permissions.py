"""Who a network may write to and who may invite its ghosts: "*", server names, user IDs."""

from __future__ import annotations

import pytest

from dmbridge.permissions import RuleError, UserRules


def test_star_allows_everyone() -> None:
    rules = UserRules.parse(["*"])
    assert rules.everyone and not rules.nobody
    assert rules.allows("@alice:example.org")
    assert rules.allows("@bob:other.net:8448")


def test_empty_list_allows_nobody() -> None:
    rules = UserRules.parse([])
    assert rules.nobody
    assert not rules.allows("@alice:example.org")
    assert not rules.allows("")


def test_server_names_match_the_whole_server_case_insensitively() -> None:
    rules = UserRules.parse(["Example.ORG", "  other.net  "])
    assert not rules.everyone and not rules.nobody
    assert rules.servers == frozenset({"example.org", "other.net"})
    assert rules.allows("@alice:example.org")
    assert rules.allows("@Bob:EXAMPLE.org")
    assert rules.allows("@carol:other.net")
    assert not rules.allows("@alice:sub.example.org")
    assert not rules.allows("@alice:example.org.evil.com")
    assert not rules.allows("@alice:notexample.org")
    assert not rules.allows("@alice:example.org:8448")  # a server with a port is another one
    assert not rules.allows("example.org")  # not a user ID at all


def test_server_with_port() -> None:
    rules = UserRules.parse(["matrix.example.org:8448", "[::1]:8008", "127.0.0.1"])
    assert rules.allows("@alice:matrix.example.org:8448")
    assert not rules.allows("@alice:matrix.example.org")
    assert not rules.allows("@alice:matrix.example.org:443")
    assert rules.allows("@alice:[::1]:8008")
    assert rules.allows("@alice:127.0.0.1")


def test_user_ids_match_exactly() -> None:
    rules = UserRules.parse(["@alice:example.org", "@bob:other.net:8448"])
    assert rules.users == frozenset({"@alice:example.org", "@bob:other.net:8448"})
    assert rules.servers == frozenset()
    assert rules.allows("@alice:example.org")
    assert rules.allows("@bob:other.net:8448")
    assert not rules.allows("@alicia:example.org")
    assert not rules.allows("@carol:example.org")  # a user rule does not open its server
    assert not rules.allows("@bob:other.net")
    assert not rules.allows("@alice:example.org.evil.com")


def test_mixed_rules() -> None:
    rules = UserRules.parse(["example.org", "@bob:other.net"])
    assert rules.allows("@anyone:example.org")
    assert rules.allows("@bob:other.net")
    assert not rules.allows("@carol:other.net")


@pytest.mark.parametrize(
    "entry",
    [
        "", "   ", None, 5, ["*"], {"user": "@a:b"},
        "@alice",  # no server
        "@:example.org",  # no localpart
        "alice:example.org",  # a user without the sigil
        "@alice:",  # empty server
        "@alice:exa mple.org",
        "@ali ce:example.org",
        "*.example.org",  # no wildcards but "*" itself
        "**",
        "example.org:port",
        "example.org:123456",
        "example.org/path",
        "https://example.org",
        "#room:example.org",
        "!room:example.org",
    ],
)
def test_bad_entries_are_refused(entry: object) -> None:
    with pytest.raises(RuleError, match="is not '\\*', a server name or a user ID"):
        UserRules.parse(["example.org", entry])


def test_parse_takes_any_iterable() -> None:
    rules = UserRules.parse(iter(["@alice:example.org"]))
    assert rules.allows("@alice:example.org")
    assert not rules.allows("@bob:example.org")
