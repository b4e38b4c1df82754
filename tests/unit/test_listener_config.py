"""The appservice.listener block: defaults, upgrade of an older file, env overrides, checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from dmbridge.__main__ import generate
from dmbridge.config import ConfigError, open_config
from dmbridge.listener import ListenerSettings


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    generate(path, tmp_path / "registration.yaml", {})
    return path


def test_defaults(config_path: Path) -> None:
    assert open_config(config_path, environ={}, upgrade=True).listener == ListenerSettings()


def test_an_older_file_without_the_block_gets_it_with_its_comments(config_path: Path) -> None:
    yaml = YAML()
    data = yaml.load(config_path)
    del data["appservice"]["listener"]
    yaml.dump(data, config_path)
    assert "idle_timeout" not in config_path.read_text()
    assert open_config(config_path, environ={}, upgrade=True).listener == ListenerSettings()
    text = config_path.read_text()
    assert "idle_timeout: 180" in text
    assert "# The most connections open at once." in text


def test_environment_overrides(config_path: Path) -> None:
    settings = open_config(config_path, environ={
        "DMBRIDGE_APPSERVICE__LISTENER__MAX_CONNECTIONS": "200",
        "DMBRIDGE_APPSERVICE__LISTENER__BODY_STALL_TIMEOUT": "5",
    })
    assert settings.listener.max_connections == 200
    assert settings.listener.body_stall_timeout == 5.0


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("idle_timeout", 0, "must be a number from 1 to 86400"),
    ("header_timeout", "soon", "must be a number from 1 to 3600"),
    ("max_connections", -1, "must be an integer from 0 to 1000000"),
    ("max_uploads_per_network", 0, "must be an integer from 1 to 1000"),
])
def test_bad_values_name_their_key(config_path: Path, key: str, value: object, fragment: str
                                   ) -> None:
    yaml = YAML()
    data = yaml.load(config_path)
    data["appservice"]["listener"][key] = value
    yaml.dump(data, config_path)
    with pytest.raises(ConfigError) as e:
        open_config(config_path, environ={})
    assert e.value.key == f"appservice.listener.{key}"
    assert fragment in str(e.value)
