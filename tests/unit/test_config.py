"""The config file: generated, upgraded in place, overridden from the environment, validated."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML
from yarl import URL

from dmbridge.__main__ import generate
from dmbridge.config import ConfigError, open_config

Edit = Callable[[Any], None]


def generated(directory: Path) -> Path:
    config = directory / "config.yaml"
    generate(config, directory / "registration.yaml", {})
    return config


def load(path: Path) -> Any:
    return YAML(typ="safe").load(path)


def edit(path: Path, change: Edit) -> None:
    yaml = YAML()
    data = yaml.load(path)
    change(data)
    yaml.dump(data, path)


def tokens(config: Any) -> list[str]:
    appservice = config["appservice"]
    return [appservice["as_token"], appservice["hs_token"], *config["networks"][0]["tokens"]]


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return generated(tmp_path)


def test_generate_writes_fresh_tokens_and_keeps_comments(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    first = generated(tmp_path / "a")
    second = generated(tmp_path / "b")  # generate creates the missing folder
    first_tokens, second_tokens = tokens(load(first)), tokens(load(second))
    assert len(first_tokens) == 3
    for token in first_tokens + second_tokens:
        assert token != "generate"
        assert len(token) >= 32
    assert len(set(first_tokens + second_tokens)) == 6
    text = first.read_text()
    assert "# The homeserver's client-server API" in text
    assert "# A regular expression every remote user ID of this network must match" in text
    assert first.stat().st_mode & 0o077 == 0  # secrets: not readable by others


def test_registration_matches_config(config_path: Path) -> None:
    config = load(config_path)
    registration = load(config_path.parent / "registration.yaml")
    appservice = config["appservice"]
    assert registration["id"] == appservice["id"] == "dmbridge"
    assert registration["url"] == appservice["address"]
    assert registration["as_token"] == appservice["as_token"]
    assert registration["hs_token"] == appservice["hs_token"]
    assert registration["sender_localpart"] == appservice["bot_username"]
    regexes = [ns["regex"] for ns in registration["namespaces"]["users"]]
    assert all(ns["exclusive"] for ns in registration["namespaces"]["users"])

    def claimed(user_id: str) -> bool:
        return any(re.fullmatch(regex, user_id) for regex in regexes)

    assert claimed("@dm_example_=2b15551234567:example.org")
    assert claimed("@dm_example__alice:example.org")
    assert claimed("@dmbridge_bot:example.org")
    assert not claimed("@alice:example.org")
    assert not claimed("@dm_example_alice:example.net")


def test_generate_again_keeps_tokens_and_edits(config_path: Path) -> None:
    before = tokens(load(config_path))
    text = config_path.read_text()
    assert "domain: example.org" in text
    config_path.write_text(text.replace("domain: example.org", "domain: chat.example.net"))

    generate(config_path, config_path.parent / "registration.yaml", {"appservice.port": 8081})

    after = load(config_path)
    assert tokens(after) == before
    assert after["homeserver"]["domain"] == "chat.example.net"
    assert after["appservice"]["port"] == 8081
    registration = (config_path.parent / "registration.yaml").read_text()
    assert r"example\.net" in registration
    assert before[0] in registration


def test_open_config_upgrades_the_file_keeping_values(config_path: Path) -> None:
    text = config_path.read_text()
    section = "# The HTTP API platforms call (under /_dmbridge/v1).\napi:\n"
    assert section in text
    start = text.index(section)
    end = text.index("\n\n", start) + 2
    text = text[:start] + text[end:]
    text = text.replace("level: INFO", "level: DEBUG  # my own note: noisy on purpose")
    config_path.write_text(text)
    assert "max_body_bytes" not in config_path.read_text()
    before = tokens(load(config_path))

    settings = open_config(config_path, environ={})

    assert settings.max_body_bytes == 131072
    assert settings.log_level == "DEBUG"
    upgraded = config_path.read_text()
    assert "api:\n    # The largest request body accepted, in bytes." in upgraded
    assert "max_body_bytes: 131072" in upgraded
    assert "level: DEBUG" in upgraded
    assert tokens(load(config_path)) == before


def test_env_overrides(config_path: Path) -> None:
    environ = {
        "DMBRIDGE_APPSERVICE__PORT": "8081",
        "DMBRIDGE_DATABASE__URL": "postgres://bridge:secret@db/dmbridge",
        "DMBRIDGE_NETWORKS__0__NAME": "Signal",
        "OTHER_APPSERVICE__PORT": "1",
    }
    settings = open_config(config_path, environ=environ)
    assert settings.port == 8081
    assert isinstance(settings.port, int)
    assert settings.database_url == "postgres://bridge:secret@db/dmbridge"
    assert settings.networks.get("example").name == "Signal"
    assert settings.networks.get("example").ghost_displayname("+1", "Bob") == "Bob (Signal)"
    # Overrides are not written back into the file.
    assert load(config_path)["appservice"]["port"] == 29340


@pytest.mark.parametrize(
    ("name", "key", "fragment"),
    [
        ("DMBRIDGE_NETWORKS__3__NAME", "networks.3", "names no existing item"),
        ("DMBRIDGE_NETWORKS__X__NAME", "networks.x", "names no existing item"),
        ("DMBRIDGE_LOGGING__LEVEL__COLOR", "logging.level", "goes inside a plain value"),
    ],
)
def test_env_override_with_a_bad_path(
    config_path: Path, name: str, key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={name: "x"})
    assert info.value.key == key
    assert str(info.value) == f"config key '{key}': {name} {fragment}"


def set_key(dotted: str, value: Any) -> Edit:
    def change(data: Any) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
        for part in parents:
            data = data[part]
        data[last] = value

    return change


def add_network(network_id: str, template: str, same_id_as_first: bool = False) -> Edit:
    def change(data: Any) -> None:
        first = data["networks"][0]
        if not same_id_as_first:
            first["id"] = "a"
            first["ghost_localpart"] = template
        other = copy.deepcopy(first)
        other["id"] = network_id
        other["ghost_localpart"] = template
        other["tokens"] = ["another-token-0123456789"]
        data["networks"].append(other)

    return change


INVALID = {
    "as_token placeholder": (
        set_key("appservice.as_token", "generate"),
        "appservice.as_token", 'still "generate"; run `dmbridge generate`',
    ),
    "port not a number": (
        set_key("appservice.port", "abc"),
        "appservice.port", "must be an integer from 1 to 65535, got 'abc'",
    ),
    "port too high": (
        set_key("appservice.port", 70000),
        "appservice.port", "must be an integer from 1 to 65535, got 70000",
    ),
    "homeserver not http": (
        set_key("homeserver.address", "ftp://x"),
        "homeserver.address", "must be an http(s) URL, got 'ftp://x'",
    ),
    "no networks": (set_key("networks", []), "networks", "must list at least one network"),
    "network id upper case": (
        set_key("networks.0.id", "Example"), "networks[0].id", "got 'Example'",
    ),
    "ghost without remote_id": (
        set_key("networks.0.ghost_localpart", "dm_{network}"),
        "networks[0].ghost_localpart", "must contain {remote_id} exactly once",
    ),
    "ghost with remote_id twice": (
        set_key("networks.0.ghost_localpart", "dm_{remote_id}_{remote_id}"),
        "networks[0].ghost_localpart", "must contain {remote_id} exactly once",
    ),
    "displayname unknown placeholder": (
        set_key("networks.0.displayname", "{foo} ({network_name})"),
        "networks[0].displayname", "may only use {name}, {remote_id}, {network_name}: 'foo'",
    ),
    "remote_id_pattern not a regex": (
        set_key("networks.0.remote_id_pattern", "("),
        "networks[0].remote_id_pattern", "not a valid regular expression",
    ),
    "short token": (
        set_key("networks.0.tokens", ["fifteen-chars-x"]),
        "networks[0].tokens[0]", "must be a string of 16 characters or more",
    ),
    "network id twice": (
        add_network("example", "dm2_{network}_{remote_id}", same_id_as_first=True),
        "networks[1].id", "'example' is used twice",
    ),
    "confusable ghost prefixes": (
        add_network("ab", "dm_{network}{remote_id}"),
        "networks[1].ghost_localpart",
        "ghost IDs could be confused with network 'a' (prefixes 'dm_ab', 'dm_a')",
    ),
    "logging level": (
        set_key("logging.level", "LOUD"),
        "logging.level", "must be DEBUG, INFO, WARNING or ERROR, got 'LOUD'",
    ),
    "database scheme": (
        set_key("database.url", "mysql://x"),
        "database.url", "got 'mysql://x'",
    ),
}


@pytest.mark.parametrize(("change", "key", "problem"), INVALID.values(), ids=INVALID.keys())
def test_validation_names_key_and_problem(
    config_path: Path, change: Edit, key: str, problem: str
) -> None:
    edit(config_path, change)
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={})
    assert info.value.key == key
    assert str(info.value).startswith(f"config key '{key}': ")
    assert problem in str(info.value)


def test_network_token_placeholder_tells_to_generate(config_path: Path) -> None:
    edit(config_path, set_key("networks.0.tokens", ["generate"]))
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={})
    assert info.value.key == "networks[0].tokens[0]"
    assert "dmbridge generate" in str(info.value)


@pytest.mark.parametrize(
    ("dotted", "value", "key"),
    [
        ("networks.0.displayname", "{name.first}", "networks[0].displayname"),
        ("networks.0.displayname", "{name[first]}", "networks[0].displayname"),
        ("homeserver.address", "http://localhost:port/", "homeserver.address"),
    ],
)
def test_malformed_values_are_config_errors(
    config_path: Path, dotted: str, value: str, key: str
) -> None:
    edit(config_path, set_key(dotted, value))
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={})
    assert info.value.key == key


def test_env_override_of_a_template(config_path: Path) -> None:
    environ = {"DMBRIDGE_NETWORKS__0__DISPLAYNAME": "{name} via SMS"}
    settings = open_config(config_path, environ=environ)
    assert settings.networks.get("example").ghost_displayname("+1", "Bob") == "Bob via SMS"


@pytest.mark.parametrize(("raw", "relative"), [("sqlite:rel.db", "rel.db"),
                                               ("sqlite:data/../rel.db", "rel.db"),
                                               ("sqlite:data/x.db", "data/x.db")])
def test_relative_sqlite_path_is_next_to_the_config(
    config_path: Path, raw: str, relative: str
) -> None:
    edit(config_path, set_key("database.url", raw))
    settings = open_config(config_path, environ={})
    expected = (config_path.parent / relative).resolve()
    assert settings.database_url == "sqlite:///" + str(expected).lstrip("/")
    assert URL(settings.database_url).path == str(expected)


def test_missing_file_says_to_generate(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        open_config(missing, environ={})
    assert str(missing) in str(info.value)
    assert "create it with `dmbridge generate`" in str(info.value)
    assert not missing.exists()


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError) as info:
        open_config(path, environ={})
    assert str(info.value) == f"config key '(file)': {path} is not a YAML mapping"
