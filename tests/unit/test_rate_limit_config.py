"""The rate_limits section and networks[].quotas: defaults, upgrades, overrides, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmbridge.config import ConfigError, RateLimitSettings, open_config
from dmbridge.quotas import QuotaSettings
from tests.unit.test_config import Edit, edit, generated, load, set_key


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return generated(tmp_path)


def test_defaults(config_path: Path) -> None:
    settings = open_config(config_path, environ={})
    assert settings.rate_limits == RateLimitSettings(
        request_wait=20.0, background_wait=60.0, rooms_per_second=1.0, room_burst=10)
    assert settings.networks.get("example").quotas == QuotaSettings(
        messages_per_second=20.0, message_burst=100, new_dms_per_hour=600)
    assert load(config_path.parent / "registration.yaml")["rate_limited"] is False


def test_a_network_without_quotas_gets_the_defaults(config_path: Path) -> None:
    edit(config_path, lambda data: data["networks"][0].pop("quotas"))
    settings = open_config(config_path, environ={})
    assert settings.networks.get("example").quotas == QuotaSettings()
    assert "quotas" not in load(config_path)["networks"][0]  # the networks list is the user's


def test_values_are_kept_and_read(config_path: Path) -> None:
    edit(config_path, set_key("rate_limits.request_wait", 0))
    edit(config_path, set_key("rate_limits.room_creation.per_second", 0.25))
    edit(config_path, set_key("networks.0.quotas",
                               {"messages_per_second": 0, "new_dms_per_hour": 5}))
    settings = open_config(config_path, environ={})
    assert settings.rate_limits.request_wait == 0
    assert settings.rate_limits.rooms_per_second == 0.25
    assert settings.networks.get("example").quotas == QuotaSettings(
        messages_per_second=0.0, message_burst=100, new_dms_per_hour=5)
    saved = load(config_path)
    assert saved["rate_limits"]["room_creation"]["per_second"] == 0.25
    assert saved["networks"][0]["quotas"]["new_dms_per_hour"] == 5


def test_upgrade_adds_the_missing_section(config_path: Path) -> None:
    text = config_path.read_text()
    start = text.index("# Homeserver rate limits")
    end = text.index("\n\n", start) + 2
    config_path.write_text(text[:start] + text[end:])
    assert "request_wait" not in config_path.read_text()
    assert open_config(config_path, environ={}, upgrade=True).rate_limits == RateLimitSettings()
    upgraded = config_path.read_text()
    assert "request_wait: 20" in upgraded and "# Seconds one platform request" in upgraded


def test_from_the_environment(config_path: Path) -> None:
    settings = open_config(config_path, environ={
        "DMBRIDGE_RATE_LIMITS__REQUEST_WAIT": "5",
        "DMBRIDGE_RATE_LIMITS__ROOM_CREATION__BURST": "3",
        "DMBRIDGE_NETWORKS__0__QUOTAS__NEW_DMS_PER_HOUR": "7",
    })
    assert settings.rate_limits.request_wait == 5.0
    assert settings.rate_limits.room_burst == 3
    assert settings.networks.get("example").quotas.new_dms_per_hour == 7


INVALID: dict[str, tuple[Edit, str, str]] = {
    "request_wait too long": (set_key("rate_limits.request_wait", 121),
                              "rate_limits.request_wait", "from 0 to 120, got 121"),
    "request_wait not below creation_timeout": (
        set_key("rate_limits.request_wait", 30), "rate_limits.request_wait",
        "must be below dm.creation_timeout"),
    "background_wait zero": (set_key("rate_limits.background_wait", 0),
                             "rate_limits.background_wait", "got 0"),
    "room rate zero": (set_key("rate_limits.room_creation.per_second", 0),
                       "rate_limits.room_creation.per_second", "got 0"),
    "room burst text": (set_key("rate_limits.room_creation.burst", "ten"),
                        "rate_limits.room_creation.burst", "must be an integer"),
    "quotas not a mapping": (set_key("networks.0.quotas", [1]), "networks[0].quotas",
                             "must be a mapping"),
    "unknown quota": (set_key("networks.0.quotas", {"messages_per_minute": 1}),
                      "networks[0].quotas.messages_per_minute", "unknown"),
    "negative quota": (set_key("networks.0.quotas", {"messages_per_second": -1}),
                       "networks[0].quotas.messages_per_second", "got -1"),
    "burst zero": (set_key("networks.0.quotas", {"message_burst": 0}),
                   "networks[0].quotas.message_burst", "from 1 to"),
    "fractional new DMs": (set_key("networks.0.quotas", {"new_dms_per_hour": 1.5}),
                           "networks[0].quotas.new_dms_per_hour", "must be an integer"),
    "boolean quota": (set_key("networks.0.quotas", {"messages_per_second": True}),
                      "networks[0].quotas.messages_per_second", "got True"),
}


@pytest.mark.parametrize(("change", "key", "problem"), INVALID.values(), ids=INVALID.keys())
def test_validation_names_key_and_problem(config_path: Path, change: Edit, key: str,
                                          problem: str) -> None:
    edit(config_path, change)
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={})
    assert info.value.key == key, str(info.value)
    assert problem in str(info.value)
