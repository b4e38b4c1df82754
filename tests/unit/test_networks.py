"""Ghost user IDs of a network: building, parsing back, namespaces and tokens."""

from __future__ import annotations

import re

import pytest

from dmbridge.errors import InvalidRemoteID, UnknownNetwork
from dmbridge.networks import Network, Networks

TOKEN_SMS = "sms-token-0123456789"
TOKEN_SMS_2 = "sms-token-second-one"
TOKEN_CHAT = "chat-token-0123456789"


def make_network(
    network_id: str = "sms",
    *,
    pattern: str = r"\+[0-9]{6,15}",
    tokens: tuple[str, ...] = (TOKEN_SMS, TOKEN_SMS_2),
) -> Network:
    return Network(
        id=network_id,
        name=network_id.upper(),
        domain="example.org",
        ghost_localpart="dm_{network}_{remote_id}",
        displayname="{name} ({network_name})",
        remote_id_pattern=re.compile(pattern),
        tokens=tokens,
    )


SMS = make_network()
CHAT = make_network("chat", pattern=r"[A-Za-z0-9_]{1,32}", tokens=(TOKEN_CHAT,))


def test_ghost_user_id_for_phone_number() -> None:
    assert SMS.ghost_user_id("+15551234567") == "@dm_sms_=2b15551234567:example.org"


@pytest.mark.parametrize(
    ("network", "remote_id"), [(SMS, "+15551234567"), (CHAT, "Alice_B"), (CHAT, "_")]
)
def test_parse_ghost_round_trip(network: Network, remote_id: str) -> None:
    assert network.parse_ghost(network.ghost_user_id(remote_id)) == remote_id


@pytest.mark.parametrize(
    "user_id",
    [
        "@dm_sms_=2b15551234567:other.org",  # other domain
        "@dm_chat_=2b15551234567:example.org",  # other network's prefix
        "@xx_sms_=2b15551234567:example.org",  # other prefix
        "@dm_sms_=2B15551234567:example.org",  # non-canonical escape
        "@dm_sms_+15551234567:example.org",  # unescaped '+'
        "@dm_sms_15551234567:example.org",  # escapes fine, but does not match the pattern
        "@dm_sms_:example.org",  # the bare prefix
        "@dm_sms_=2b15551234567",  # no server name
        "dm_sms_=2b15551234567:example.org",  # no sigil
    ],
)
def test_parse_ghost_rejects(user_id: str) -> None:
    assert SMS.parse_ghost(user_id) is None


@pytest.mark.parametrize("remote_id", ["5551234567", "+1", "+1555abc4567", ""])
def test_invalid_remote_id_names_the_pattern(remote_id: str) -> None:
    with pytest.raises(InvalidRemoteID) as info:
        SMS.ghost_user_id(remote_id)
    assert info.value.status == 400
    assert info.value.errcode == "DMBRIDGE_INVALID_REMOTE_ID"
    assert r"\+[0-9]{6,15}" in str(info.value)
    assert f"'{remote_id}'" in str(info.value)


def test_ghost_displayname_templates() -> None:
    assert SMS.ghost_displayname("+15551234567", "Bob") == "Bob (SMS)"
    assert SMS.ghost_displayname("+15551234567", None) == "+15551234567 (SMS)"
    assert SMS.ghost_displayname("+15551234567", "") == "+15551234567 (SMS)"
    other = Network(
        id="x", name="X Net", domain="example.org", ghost_localpart="x_{remote_id}",
        displayname="{remote_id}: {name} via {network_name}",
        remote_id_pattern=re.compile(".+"), tokens=("t" * 16,),
    )
    assert other.ghost_displayname("r1", "Ann") == "r1: Ann via X Net"


def test_namespace_regex_matches_only_its_own_ghosts() -> None:
    sms_ghost = SMS.ghost_user_id("+15551234567")
    chat_ghost = CHAT.ghost_user_id("Alice")
    assert re.fullmatch(SMS.namespace_regex(), sms_ghost)
    assert re.fullmatch(CHAT.namespace_regex(), chat_ghost)
    assert not re.fullmatch(SMS.namespace_regex(), chat_ghost)
    assert not re.fullmatch(CHAT.namespace_regex(), sms_ghost)
    assert not re.fullmatch(SMS.namespace_regex(), "@dm_sms_=2b15551234567:exampleXorg")
    assert not re.fullmatch(SMS.namespace_regex(), "@alice:example.org")


def test_accepts_token() -> None:
    assert SMS.accepts_token(TOKEN_SMS)
    assert SMS.accepts_token(TOKEN_SMS_2)
    assert not SMS.accepts_token(TOKEN_CHAT)
    assert not SMS.accepts_token("")
    assert not SMS.accepts_token(TOKEN_SMS[:-1])


def test_networks_lookup() -> None:
    networks = Networks([SMS, CHAT])
    assert len(networks) == 2
    assert [n.id for n in networks] == ["sms", "chat"]
    assert networks.get("chat") is CHAT
    assert networks.by_token(TOKEN_SMS_2) is SMS
    assert networks.by_token(TOKEN_CHAT) is CHAT
    assert networks.by_token("no-such-token-at-all") is None


def test_networks_get_unknown() -> None:
    with pytest.raises(UnknownNetwork) as info:
        Networks([SMS]).get("telegram")
    assert info.value.status == 404
    assert info.value.errcode == "DMBRIDGE_UNKNOWN_NETWORK"
    assert "telegram" in str(info.value)
    assert info.value.to_json() == {
        "errcode": "DMBRIDGE_UNKNOWN_NETWORK",
        "error": "no network 'telegram' is configured",
    }


def test_networks_parse_ghost_picks_the_right_network() -> None:
    networks = Networks([SMS, CHAT])
    assert networks.parse_ghost("@dm_chat__alice:example.org") == (CHAT, "Alice")
    assert networks.parse_ghost("@dm_sms_=2b15551234567:example.org") == (SMS, "+15551234567")
    assert networks.parse_ghost("@dm_mail_bob:example.org") is None
    assert networks.parse_ghost("@alice:example.org") is None
