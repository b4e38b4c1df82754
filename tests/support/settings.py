"""Bridge settings for tests, built through the same path as a real config file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from dmbridge.config import Config, Settings, check_shape, load_settings

SMS_TOKEN = "sms-token-0123456789abcdef"
CHAT_TOKEN = "chat-token-0123456789abcdef"
AS_TOKEN = "as-token-0123456789abcdef"
HS_TOKEN = "hs-token-0123456789abcdef"
PICKLE_KEY = "pickle-key-0123456789abcdef-0123456789"

NETWORKS = [
    {
        "id": "sms",
        "name": "SMS",
        "ghost_localpart": "dm_{network}_{remote_id}",
        "displayname": "{name} (SMS)",
        "remote_id_pattern": r"\+[1-9][0-9]{6,14}",
        "tokens": [SMS_TOKEN],
    },
    {
        "id": "chat",
        "name": "Chat",
        "ghost_localpart": "dm_{network}_{remote_id}",
        "displayname": "{name} (Chat)",
        "remote_id_pattern": "[A-Za-z0-9._-]{1,64}",
        "tokens": [CHAT_TOKEN],
    },
]


def make_settings(
    folder: Path, *, homeserver_url: str, domain: str, port: int, db_url: str,
    networks: dict[str, dict[str, Any]] | None = None, **overrides: Any,
) -> Settings:
    """Settings for tests. ``overrides`` are "section.key" values; ``networks`` adds keys to
    the named test networks, e.g. ``{"sms": {"delivery": {"mode": "webhook", ...}}}``."""
    yaml = YAML()
    data = yaml.load(resources.files("dmbridge").joinpath("example-config.yaml").read_text())
    data["homeserver"]["address"] = homeserver_url
    data["homeserver"]["domain"] = domain
    data["appservice"].update(
        address=f"http://127.0.0.1:{port}", hostname="127.0.0.1", port=port,
        as_token=AS_TOKEN, hs_token=HS_TOKEN,
    )
    data["database"]["url"] = db_url
    data["dm"]["pickle_key"] = PICKLE_KEY
    data["networks"] = [{**n, **(networks or {}).get(str(n["id"]), {})} for n in NETWORKS]
    data["logging"]["level"] = "DEBUG"
    for key, value in overrides.items():
        section, name = key.split(".")
        if isinstance(value, dict) and isinstance(data[section].get(name), dict):
            data[section][name].update(value)  # a nested block: only the keys given
        else:
            data[section][name] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    with path.open("w") as f:
        yaml.dump(data, f)
    config = Config(path)
    config.load()
    check_shape(config, str(path))  # a mistyped override fails the test as it would the bridge
    return load_settings(config)
