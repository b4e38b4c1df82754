"""logging.format and the metrics section: defaults, upgrades, overrides, validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dmbridge.config import ConfigError, MetricsSettings, open_config
from tests.unit.test_config import edit, generated, load, set_key


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return generated(tmp_path)


def test_defaults(config_path: Path) -> None:
    settings = open_config(config_path, environ={})
    assert settings.log_format == "text"
    assert settings.metrics == MetricsSettings(enabled=True, listen=None)
    assert load(config_path)["metrics"] == {"enabled": True, "listen": ""}


def test_an_old_config_gets_the_new_keys_on_upgrade(config_path: Path) -> None:
    def drop(data: Any) -> None:
        del data["metrics"]
        del data["logging"]["format"]

    edit(config_path, drop)
    assert open_config(config_path, environ={}, upgrade=True).metrics.enabled
    assert load(config_path)["metrics"] == {"enabled": True, "listen": ""}
    assert load(config_path)["logging"]["format"] == "text"


@pytest.mark.parametrize(("raw", "listen"), [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:9100", ("::1", 9100)),
    ("metrics.internal:65535", ("metrics.internal", 65535)),
])
def test_listen_addresses(config_path: Path, raw: str, listen: tuple[str, int]) -> None:
    edit(config_path, set_key("metrics.listen", raw))
    assert open_config(config_path, environ={}).metrics.listen == listen


def test_values_are_kept_and_overridable(config_path: Path) -> None:
    edit(config_path, set_key("logging.format", "json"))
    edit(config_path, set_key("metrics.enabled", False))
    settings = open_config(config_path, environ={}, upgrade=True)
    assert settings.log_format == "json" and not settings.metrics.enabled
    assert load(config_path)["logging"]["format"] == "json"
    settings = open_config(config_path, environ={"DMBRIDGE_METRICS__ENABLED": "true",
                                                 "DMBRIDGE_METRICS__LISTEN": "127.0.0.1:9200",
                                                 "DMBRIDGE_LOGGING__FORMAT": "text"})
    assert settings.metrics == MetricsSettings(enabled=True, listen=("127.0.0.1", 9200))
    assert settings.log_format == "text"


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("logging.format", "xml", "must be text or json, got 'xml'"),
    ("logging.format", "JSON", "must be text or json, got 'JSON'"),
    ("metrics.enabled", "yes please", "must be true or false, got 'yes please'"),
    ("metrics.enabled", 1, "must be true or false, got 1"),
    ("metrics.listen", "9100", 'must be "" or HOST:PORT'),
    ("metrics.listen", ":9100", 'must be "" or HOST:PORT'),
    ("metrics.listen", "127.0.0.1:0", 'must be "" or HOST:PORT'),
    ("metrics.listen", "127.0.0.1:65536", 'must be "" or HOST:PORT'),
    ("metrics.listen", "::1:9100", 'must be "" or HOST:PORT'),
    ("metrics.listen", "127.0.0.1:http", 'must be "" or HOST:PORT'),
    ("metrics.listen", 9100, 'must be "" or HOST:PORT'),
    ("metrics.listen", "127.0.0.1:29340", "is the bridge's own listener"),
    ("metrics.listen", "0.0.0.0:29340", "is the bridge's own listener"),
])
def test_invalid_values_name_the_key(config_path: Path, key: str, value: Any, problem: str
                                     ) -> None:
    edit(config_path, set_key(key, value))
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={})
    assert info.value.key == key
    assert problem in str(info.value)
