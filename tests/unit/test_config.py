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
from dmbridge.config import (
    ConfigError,
    DeliverySettings,
    MediaSettings,
    RetentionSettings,
    open_config,
)
from dmbridge.networks import Delivery

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
    assert open_config(config_path, environ={}).max_body_bytes == 131072
    assert config_path.read_text() == text  # only `run` writes the upgrade

    settings = open_config(config_path, environ={}, upgrade=True)

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
    "admin notices to a bare name": (
        set_key("admin_notices.user", "admin"),
        "admin_notices.user", "must be empty or a user ID (@user:server), got 'admin'",
    ),
    "admin notices to a room alias": (
        set_key("admin_notices.room", "#ops:example.org"),
        "admin_notices.room", "must be empty or a room ID (!room:server)",
    ),
    "admin notices to a user and a room": (
        lambda data: data["admin_notices"].update(user="@a:example.org", room="!r:example.org"),
        "admin_notices.room", "set admin_notices.user or room, not both",
    ),
    "admin notices window": (
        set_key("admin_notices.repeat_window", -1),
        "admin_notices.repeat_window", "from 0 to 604800, got -1",
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


# --- delivery, permissions and dm.on_leave --------------------------------------------------


WEBHOOK_SECRET = "webhook-secret-0123456789"


def network_key(name: str, value: Any) -> Edit:
    def change(data: Any) -> None:
        data["networks"][0][name] = value

    return change


def drop_network_keys(*names: str) -> Edit:
    def change(data: Any) -> None:
        for name in names:
            data["networks"][0].pop(name, None)

    return change


DELIVERY_INVALID = {
    "webhook without url": (
        network_key("delivery", {"mode": "webhook", "secret": WEBHOOK_SECRET}),
        "networks[0].delivery.url", "must be an http(s) URL, got None",
    ),
    "webhook url not http": (
        network_key("delivery", {"mode": "webhook", "url": "ftp://platform.example/hook",
                                 "secret": WEBHOOK_SECRET}),
        "networks[0].delivery.url", "must be an http(s) URL",
    ),
    "webhook url without host": (
        network_key("delivery", {"mode": "webhook", "url": "http://", "secret": WEBHOOK_SECRET}),
        "networks[0].delivery.url", "must be an http(s) URL",
    ),
    "webhook secret placeholder": (
        network_key("delivery", {"mode": "webhook", "url": "https://platform.example/hook",
                                 "secret": "generate"}),
        "networks[0].delivery.secret", 'still "generate"; run `dmbridge generate`',
    ),
    "webhook secret short": (
        network_key("delivery", {"mode": "webhook", "url": "https://platform.example/hook",
                                 "secret": "x" * 15}),
        "networks[0].delivery.secret", "must be a string of 16 characters or more",
    ),
    "webhook secret missing": (
        network_key("delivery", {"mode": "webhook", "url": "https://platform.example/hook"}),
        "networks[0].delivery.secret", "must be a string of 16 characters or more",
    ),
    "webhook secret not a string": (
        network_key("delivery", {"mode": "webhook", "url": "https://platform.example/hook",
                                 "secret": 12345678901234567890}),
        "networks[0].delivery.secret", "must be a string of 16 characters or more",
    ),
    "delivery mode unknown": (
        network_key("delivery", {"mode": "push", "url": "https://platform.example/hook",
                                 "secret": WEBHOOK_SECRET}),
        "networks[0].delivery.mode", "must be webhook or pull, got 'push'",
    ),
    "delivery not a mapping": (
        network_key("delivery", "webhook"),
        "networks[0].delivery", "must be a mapping with mode, url, secret",
    ),
    "send_to bad entry": (
        network_key("permissions", {"send_to": ["example.org", "not a server!"]}),
        "networks[0].permissions.send_to", "'not a server!' is not '*', a server name",
    ),
    "send_to user without server": (
        network_key("permissions", {"send_to": ["@alice"]}),
        "networks[0].permissions.send_to", "'@alice'",
    ),
    "send_to not a list": (
        network_key("permissions", {"send_to": "*"}),
        "networks[0].permissions.send_to", "must be a list, got '*'",
    ),
    "invites_from bad entry": (
        network_key("permissions", {"invites_from": [""]}),
        "networks[0].permissions.invites_from", "is not '*', a server name or a user ID",
    ),
    "permissions not a mapping": (
        network_key("permissions", ["*"]),
        "networks[0].permissions", "must be a mapping with send_to, invites_from",
    ),
    "on_leave unknown": (
        set_key("dm.on_leave", "kick"),
        "dm.on_leave", "must be one of reinvite, new_room, got 'kick'",
    ),
    "encryption unknown": (
        set_key("dm.encryption", "always"),
        "dm.encryption", "must be one of off, allow, default, require, got 'always'",
    ),
    "on_leave not a string": (
        set_key("dm.on_leave", 1),
        "dm.on_leave", "must be a non-empty string",
    ),
    "max_attempts zero": (
        set_key("delivery.max_attempts", 0),
        "delivery.max_attempts", "must be an integer from 1 to 1000, got 0",
    ),
    "max_attempts too many": (
        set_key("delivery.max_attempts", 1001), "delivery.max_attempts", "got 1001",
    ),
    "max_attempts not whole": (
        set_key("delivery.max_attempts", 2.5), "delivery.max_attempts", "got 2.5",
    ),
    "max_attempts boolean": (
        set_key("delivery.max_attempts", True), "delivery.max_attempts", "got True",
    ),
    "max_age zero": (
        set_key("delivery.max_age", 0), "delivery.max_age", "must be a number from 1 to",
    ),
    "max_age over 90 days": (
        set_key("delivery.max_age", 90 * 86400 + 1), "delivery.max_age", "got 7776001",
    ),
    "initial_backoff zero": (
        set_key("delivery.initial_backoff", 0), "delivery.initial_backoff", "got 0",
    ),
    "max_backoff text": (
        set_key("delivery.max_backoff", "1m"), "delivery.max_backoff", "got '1m'",
    ),
    "timeout too small": (
        set_key("delivery.timeout", 0.05), "delivery.timeout", "from 0.1 to 600, got 0.05",
    ),
    "concurrency zero": (
        set_key("delivery.concurrency", 0), "delivery.concurrency", "from 1 to 256, got 0",
    ),
    "concurrency too high": (
        set_key("delivery.concurrency", 257), "delivery.concurrency", "got 257",
    ),
    "pull_ack_timeout zero": (
        set_key("delivery.pull_ack_timeout", 0), "delivery.pull_ack_timeout", "got 0",
    ),
    "pull_max_wait too long": (
        set_key("delivery.pull_max_wait", 601), "delivery.pull_max_wait",
        "from 1 to 600, got 601",
    ),
}


@pytest.mark.parametrize(("change", "key", "problem"), DELIVERY_INVALID.values(),
                         ids=DELIVERY_INVALID.keys())
def test_delivery_permissions_on_leave_validation(
    config_path: Path, change: Edit, key: str, problem: str
) -> None:
    edit(config_path, change)
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={})
    assert info.value.key == key
    assert str(info.value).startswith(f"config key '{key}': ")
    assert problem in str(info.value)


def test_generate_fills_the_delivery_secret(config_path: Path) -> None:
    secret = load(config_path)["networks"][0]["delivery"]["secret"]
    assert secret != "generate" and len(secret) >= 32
    assert secret not in tokens(load(config_path))
    # Switched to webhook, the generated secret is the one used to sign.
    edit(config_path, set_key("networks.0.delivery.mode", "webhook"))
    delivery = open_config(config_path, environ={}).networks.get("example").delivery
    assert (delivery.mode, delivery.url, delivery.secret) == (
        "webhook", "https://platform.example/dmbridge/webhook", secret)


def test_generate_again_fills_a_new_placeholder_and_keeps_the_rest(config_path: Path) -> None:
    before = tokens(load(config_path))
    edit(config_path, set_key("networks.0.delivery.secret", "generate"))
    edit(config_path, set_key("networks.0.delivery.mode", "webhook"))
    generate(config_path, config_path.parent / "registration.yaml", {})
    after = load(config_path)
    secret = after["networks"][0]["delivery"]["secret"]
    assert secret != "generate" and len(secret) >= 32
    assert tokens(after) == before
    assert open_config(config_path, environ={}).networks.get("example").delivery.secret == secret


def test_generated_defaults_are_pull_and_everyone(config_path: Path) -> None:
    settings = open_config(config_path, environ={})
    network = settings.networks.get("example")
    assert network.delivery == Delivery()
    assert network.send_to.everyone and network.invites_from.everyone
    assert settings.on_leave == "reinvite"
    assert settings.encryption == "off"
    assert settings.delivery == DeliverySettings()


def test_without_delivery_or_permissions_keys(config_path: Path) -> None:
    edit(config_path, drop_network_keys("delivery", "permissions"))
    network = open_config(config_path, environ={}).networks.get("example")
    assert (network.delivery.mode, network.delivery.url, network.delivery.secret) == (
        "pull", None, None)
    assert network.send_to.allows("@anyone:anywhere.example")
    assert network.invites_from.allows("@anyone:anywhere.example")
    assert not network.send_to.nobody


def test_pull_mode_ignores_url_and_secret(config_path: Path) -> None:
    edit(config_path, network_key("delivery", {"mode": "pull", "url": "not a url",
                                               "secret": "short"}))
    assert open_config(config_path, environ={}).networks.get("example").delivery == Delivery()


def test_permissions_are_parsed(config_path: Path) -> None:
    edit(config_path, network_key("permissions", {"send_to": ["example.org", "@bob:other.net"],
                                                  "invites_from": []}))
    network = open_config(config_path, environ={}).networks.get("example")
    assert network.send_to.allows("@alice:example.org")
    assert network.send_to.allows("@bob:other.net")
    assert not network.send_to.allows("@carol:other.net")
    assert network.invites_from.nobody
    assert not network.invites_from.allows("@alice:example.org")


def test_permissions_with_only_one_list_default_the_other_to_everyone(
    config_path: Path,
) -> None:
    edit(config_path, network_key("permissions", {"send_to": ["example.org"]}))
    network = open_config(config_path, environ={}).networks.get("example")
    assert not network.send_to.allows("@carol:other.net")
    assert network.invites_from.allows("@carol:other.net")


def test_delivery_settings_are_read(config_path: Path) -> None:
    for key, value in {"max_attempts": 5, "max_age": 3600, "initial_backoff": 0.5,
                       "max_backoff": 60, "timeout": 2.5, "concurrency": 3,
                       "pull_ack_timeout": 20, "pull_max_wait": 25}.items():
        edit(config_path, set_key(f"delivery.{key}", value))
    edit(config_path, set_key("dm.on_leave", "new_room"))
    settings = open_config(config_path, environ={})
    assert settings.delivery == DeliverySettings(
        max_attempts=5, max_age=3600.0, initial_backoff=0.5, max_backoff=60.0, timeout=2.5,
        concurrency=3, pull_ack_timeout=20.0, pull_max_wait=25.0)
    assert settings.on_leave == "new_room"


def test_delivery_mode_from_the_environment(config_path: Path) -> None:
    environ = {
        "DMBRIDGE_NETWORKS__0__DELIVERY__MODE": "webhook",
        "DMBRIDGE_NETWORKS__0__DELIVERY__URL": "http://127.0.0.1:9000/hook",
        "DMBRIDGE_DELIVERY__MAX_ATTEMPTS": "7",
    }
    settings = open_config(config_path, environ=environ)
    delivery = settings.networks.get("example").delivery
    assert (delivery.mode, delivery.url) == ("webhook", "http://127.0.0.1:9000/hook")
    assert settings.delivery.max_attempts == 7


def test_upgrade_adds_missing_delivery_section(config_path: Path) -> None:
    text = config_path.read_text()
    start = text.index("# Delivery of Matrix users' replies")
    end = text.index("\n\n", start) + 2
    config_path.write_text(text[:start] + text[end:])
    assert "max_attempts" not in config_path.read_text()
    settings = open_config(config_path, environ={}, upgrade=True)
    assert settings.delivery == DeliverySettings()
    assert "max_attempts: 20" in config_path.read_text()


# --- media ----------------------------------------------------------------------------------


def test_media_defaults(config_path: Path) -> None:
    settings = open_config(config_path, environ={})
    assert settings.appservice_address == "http://127.0.0.1:29340"
    assert settings.media == MediaSettings(max_upload_bytes=52428800, link_ttl=86400.0,
                                           public_url="http://127.0.0.1:29340")
    assert isinstance(settings.media.link_ttl, float)


@pytest.mark.parametrize("empty", ["", None])
def test_media_public_url_empty_follows_the_appservice_address(
    config_path: Path, empty: str | None
) -> None:
    edit(config_path, set_key("appservice.address", "http://bridge.internal:29340/"))
    edit(config_path, set_key("media.public_url", empty))
    settings = open_config(config_path, environ={})
    assert settings.media.public_url == "http://bridge.internal:29340"


@pytest.mark.parametrize(("value", "expected"), [
    ("https://bridge.example.org/", "https://bridge.example.org"),
    ("https://example.org/dmbridge//", "https://example.org/dmbridge"),
    ("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
])
def test_media_explicit_values_are_kept(config_path: Path, value: str, expected: str) -> None:
    edit(config_path, set_key("media.public_url", value))
    edit(config_path, set_key("media.max_upload_bytes", 1024))
    edit(config_path, set_key("media.link_ttl", 30 * 86400))
    media = open_config(config_path, environ={}).media
    assert media == MediaSettings(max_upload_bytes=1024, link_ttl=30 * 86400.0,
                                  public_url=expected)


def test_media_from_the_environment(config_path: Path) -> None:
    media = open_config(config_path, environ={
        "DMBRIDGE_MEDIA__PUBLIC_URL": "https://media.example.net/",
        "DMBRIDGE_MEDIA__LINK_TTL": "600",
        "DMBRIDGE_MEDIA__MAX_UPLOAD_BYTES": "2048",
    }).media
    assert media == MediaSettings(max_upload_bytes=2048, link_ttl=600.0,
                                  public_url="https://media.example.net")


MEDIA_INVALID = {
    "link_ttl zero": (
        set_key("media.link_ttl", 0), "media.link_ttl", "must be a number from 10 to",
    ),
    "link_ttl too short": (set_key("media.link_ttl", 9.5), "media.link_ttl", "got 9.5"),
    "link_ttl over 30 days": (
        set_key("media.link_ttl", 30 * 86400 + 1), "media.link_ttl", "got 2592001",
    ),
    "link_ttl text": (set_key("media.link_ttl", "1d"), "media.link_ttl", "got '1d'"),
    "link_ttl boolean": (set_key("media.link_ttl", True), "media.link_ttl", "got True"),
    "max_upload_bytes text": (
        set_key("media.max_upload_bytes", "big"), "media.max_upload_bytes",
        "must be an integer from 1024 to",
    ),
    "max_upload_bytes too small": (
        set_key("media.max_upload_bytes", 1023), "media.max_upload_bytes", "got 1023",
    ),
    "max_upload_bytes not whole": (
        set_key("media.max_upload_bytes", 2048.5), "media.max_upload_bytes", "got 2048.5",
    ),
    "public_url not http": (
        set_key("media.public_url", "ftp://x"), "media.public_url",
        "must be an http(s) URL, got 'ftp://x'",
    ),
    "public_url without host": (
        set_key("media.public_url", "https://"), "media.public_url", "must be an http(s) URL",
    ),
    "public_url not a URL": (
        set_key("media.public_url", "bridge.example.org"), "media.public_url",
        "must be an http(s) URL",
    ),
    "public_url not a string": (
        set_key("media.public_url", 5), "media.public_url", "must be a non-empty string",
    ),
}


@pytest.mark.parametrize(("change", "key", "problem"), MEDIA_INVALID.values(),
                         ids=MEDIA_INVALID.keys())
def test_media_validation_names_key_and_problem(
    config_path: Path, change: Edit, key: str, problem: str
) -> None:
    edit(config_path, change)
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={})
    assert info.value.key == key
    assert str(info.value).startswith(f"config key '{key}': ")
    assert problem in str(info.value)


def test_upgrade_adds_missing_media_section(config_path: Path) -> None:
    text = config_path.read_text()
    start = text.index("# Media: files platforms upload")
    end = text.index("\n\n", start) + 2
    config_path.write_text(text[:start] + text[end:])
    assert "link_ttl" not in config_path.read_text()
    settings = open_config(config_path, environ={}, upgrade=True)
    assert settings.media == MediaSettings(public_url=settings.appservice_address)
    upgraded = config_path.read_text()
    assert "max_upload_bytes: 52428800" in upgraded and "link_ttl: 86400" in upgraded


def test_admin_notices_are_off_by_default_and_read(config_path: Path) -> None:
    settings = open_config(config_path, environ={})
    assert not settings.admin_notices.enabled
    assert (settings.admin_notices.repeat_window, settings.admin_notices.outage_after) == (
        600, 300)
    settings = open_config(config_path, environ={
        "DMBRIDGE_ADMIN_NOTICES__USER": "@admin:example.org",
        "DMBRIDGE_ADMIN_NOTICES__OUTAGE_AFTER": "60",
    })
    assert settings.admin_notices.enabled
    assert settings.admin_notices.user == "@admin:example.org"
    assert settings.admin_notices.outage_after == 60


def test_retention_defaults_and_values(config_path: Path) -> None:
    assert open_config(config_path, environ={}).retention == RetentionSettings(
        message_maps=90, history=365, media=30, dead_letters=30)
    edit(config_path, set_key("retention.history", 0))
    edit(config_path, set_key("retention.message_maps", 1.5))
    retention = open_config(config_path, environ={}).retention
    assert (retention.history, retention.message_maps) == (0, 1.5)


@pytest.mark.parametrize(("value", "problem"), [
    (-1, "must be a number from 0 to 36500, got -1"),
    ("forever", "must be a number from 0 to 36500, got 'forever'"),
    (36501, "got 36501"),
    (0.5, "must be 0 (keep for ever) or from 1 to 36500, got 0.5"),
])
def test_retention_validation_names_key_and_problem(config_path: Path, value: object,
                                                    problem: str) -> None:
    edit(config_path, set_key("retention.dead_letters", value))
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={})
    assert info.value.key == "retention.dead_letters"
    assert str(info.value).startswith("config key 'retention.dead_letters': ")
    assert problem in str(info.value)


def test_upgrade_adds_missing_retention_section(config_path: Path) -> None:
    text = config_path.read_text()
    start = text.index("# How long the bridge keeps")
    end = text.index("\n\n", start) + 2
    config_path.write_text(text[:start] + text[end:])
    assert "retention" not in config_path.read_text()
    settings = open_config(config_path, environ={}, upgrade=True)
    assert settings.retention == RetentionSettings()
    assert "message_maps: 90" in config_path.read_text()


# --- the key of the ghosts' encryption state ---------------------------------------------------

def test_generate_writes_a_random_pickle_key_that_encryption_uses(tmp_path: Path) -> None:
    first, second = generated(tmp_path / "a"), generated(tmp_path / "b")
    keys = [load(path)["dm"]["pickle_key"] for path in (first, second)]
    assert keys[0] != keys[1] and all(len(key) >= 32 and key != "generate" for key in keys)
    edit(first, set_key("dm.encryption", "allow"))
    assert open_config(first, environ={}).pickle_key == keys[0]


def test_generate_again_fills_the_pickle_key_of_a_config_without_one(config_path: Path) -> None:
    edit(config_path, lambda data: data["dm"].pop("pickle_key"))
    edit(config_path, set_key("dm.encryption", "allow"))
    before = tokens(load(config_path))
    generate(config_path, config_path.parent / "registration.yaml", {})
    key = load(config_path)["dm"]["pickle_key"]
    assert key != "generate" and len(key) >= 32
    assert tokens(load(config_path)) == before
    assert open_config(config_path, environ={}).pickle_key == key


@pytest.mark.parametrize(("value", "problem"), [
    ("generate", 'still "generate"; run `dmbridge generate`'),
    ("short-key-0123456789", "must be 32 characters or more"),
    ("", "must be a non-empty string"),
])
def test_encryption_on_without_a_usable_pickle_key_is_refused(
    config_path: Path, value: str, problem: str,
) -> None:
    edit(config_path, set_key("dm.pickle_key", value))
    edit(config_path, set_key("dm.encryption", "allow"))
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={})
    assert info.value.key == "dm.pickle_key"
    assert problem in str(info.value)


def test_an_upgraded_config_with_encryption_on_asks_for_generate(config_path: Path) -> None:
    edit(config_path, lambda data: data["dm"].pop("pickle_key"))
    edit(config_path, set_key("dm.encryption", "default"))
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={}, upgrade=True)
    assert info.value.key == "dm.pickle_key"
    assert "dmbridge generate" in str(info.value)


def test_with_encryption_off_the_pickle_key_is_not_needed(config_path: Path) -> None:
    edit(config_path, set_key("dm.pickle_key", "generate"))
    assert open_config(config_path, environ={}).pickle_key == ""
