"""A mistyped key never loses a setting: `dmbridge` refuses it, names it and its line, and
leaves the file as it was. The same for a file that is not YAML."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from dmbridge.__main__ import generate, main
from dmbridge.config import Config, ConfigError, open_config

Edit = Callable[[Any], None]


def dmbridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, as an admin runs it (no DMBRIDGE_ variables but ``env``)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DMBRIDGE_")}
    return subprocess.run([sys.executable, "-m", "dmbridge", *args], capture_output=True,
                          text=True, env={**environ, **(env or {})}, timeout=60, check=False)


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    generate(path, tmp_path / "registration.yaml", {})
    return path


def edit(path: Path, change: Edit) -> None:
    yaml = YAML()
    yaml.indent(4)
    data = yaml.load(path)
    change(data)
    yaml.dump(data, path)


def rename(dotted: str, new: str) -> Edit:
    """Rename the key at ``dotted`` (digits index lists) in place, keeping its value."""
    def change(data: Any) -> None:
        *parents, old = [int(p) if p.isdigit() else p for p in dotted.split(".")]
        for part in parents:
            data = data[part]
        position = list(data).index(old)
        data.insert(position, new, data.pop(old))

    return change


def line_of(path: Path, text: str) -> int:
    lines = path.read_text().splitlines()
    matching = [i + 1 for i, line in enumerate(lines) if line.strip().startswith(text)]
    assert len(matching) == 1, (text, matching)
    return matching[0]


TYPOS = {
    "top-level key": ("logging", "loging", "loging", "did you mean `logging`?"),
    "nested key": ("appservice.port", "prot", "appservice.prot", "did you mean `port`?"),
    "network key": ("networks.0.displayname", "dispalyname", "networks[0].dispalyname",
                    "did you mean `displayname`?"),
    "network section": ("networks.0.delivery", "delivry", "networks[0].delivry",
                        "did you mean `delivery`?"),
    "key in a network's delivery": ("networks.0.delivery.mode", "mdoe",
                                    "networks[0].delivery.mdoe", "did you mean `mode`?"),
    "key in a network's quotas": ("networks.0.quotas.message_burst", "messages_burst",
                                  "networks[0].quotas.messages_burst",
                                  "did you mean `message_burst`?"),
}


@pytest.mark.parametrize(("dotted", "typo", "key", "hint"), TYPOS.values(), ids=TYPOS.keys())
def test_run_refuses_a_mistyped_key_and_leaves_the_file_as_it_was(
    config_path: Path, dotted: str, typo: str, key: str, hint: str
) -> None:
    edit(config_path, rename(dotted, typo))
    before = config_path.read_bytes()
    line = line_of(config_path, f"{typo}:")

    done = dmbridge("run", "-c", str(config_path))

    assert done.returncode == 2
    assert done.stderr == (
        f"dmbridge: config key '{key}' ({config_path}, line {line}): unknown key; {hint}\n"
    )
    assert done.stdout == ""
    assert config_path.read_bytes() == before


def test_run_refuses_a_mistyped_environment_variable(config_path: Path) -> None:
    before = config_path.read_bytes()
    done = dmbridge("run", "-c", str(config_path), env={
        "DMBRIDGE_APPSERVICE__PROT": "18091",
        "DMBRIDGE_CACHE": "/var/cache/dmbridge",  # not a section: someone else's variable
    })
    assert done.returncode == 2
    assert done.stderr == (
        "dmbridge: config key 'appservice.prot' (DMBRIDGE_APPSERVICE__PROT): unknown key; "
        "did you mean DMBRIDGE_APPSERVICE__PORT?\n"
    )
    assert config_path.read_bytes() == before


def test_every_unknown_key_is_named_at_once(config_path: Path) -> None:
    edit(config_path, rename("appservice.port", "prot"))
    edit(config_path, rename("networks.0.delivery", "delivry"))

    def stray(data: Any) -> None:
        data["level"] = "DEBUG"

    edit(config_path, stray)
    before = config_path.read_bytes()
    done = dmbridge("run", "-c", str(config_path),
                    env={"DMBRIDGE_NETWORKS__0__TOKEN": "x" * 20})
    assert done.returncode == 2
    where = str(config_path)
    assert done.stderr.splitlines() == [
        f"dmbridge: config key 'appservice.prot' ({where}, line {line_of(config_path, 'prot:')}"
        "): unknown key; did you mean `port`?",
        f"dmbridge: config key 'networks[0].delivry' ({where}, line "
        f"{line_of(config_path, 'delivry:')}): unknown key; did you mean `delivery`?",
        f"dmbridge: config key 'level' ({where}, line {line_of(config_path, 'level: DEBUG')}): "
        "unknown key; did you mean `logging.level`?",
        "dmbridge: config key 'networks[0].token' (DMBRIDGE_NETWORKS__0__TOKEN): unknown key; "
        "did you mean DMBRIDGE_NETWORKS__0__TOKENS?",
    ]
    assert config_path.read_bytes() == before


def test_a_key_with_nothing_close_lists_the_keys_there(config_path: Path) -> None:
    edit(config_path, rename("dm.on_leave", "xyzzy"))
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={})
    assert str(info.value).endswith(
        "unknown key; known keys here: creation_timeout, on_leave, encryption, pickle_key"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["generate"],
        ["send", "--network", "example", "--sender", "+1", "--to", "@a:example.org",
         "--text", "hi"],
        ["list-dms"],
        ["dead-letters"],
        ["clear-declined", "--network", "example", "--remote-id", "+1", "--user",
         "@a:example.org"],
    ],
    ids=lambda argv: argv[0],
)
def test_every_command_refuses_a_mistyped_key(
    config_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    edit(config_path, rename("appservice.port", "prot"))
    before = config_path.read_bytes()
    capsys.readouterr()
    assert main([*argv, "-c", str(config_path)]) == 2
    assert capsys.readouterr().err == (
        f"dmbridge: config key 'appservice.prot' ({config_path}, line "
        f"{line_of(config_path, 'prot:')}): unknown key; did you mean `port`?\n"
    )
    assert config_path.read_bytes() == before


def test_an_invalid_config_is_not_upgraded(config_path: Path) -> None:
    """The upgrade (here: the missing `api` section) is written only once the settings are
    valid."""
    text = config_path.read_text()
    start = text.index("# The HTTP API platforms call")
    text = text[:start] + text[text.index("\n\n", start) + 2 :]
    config_path.write_text(text.replace("level: INFO", "level: LOUD"))
    before = config_path.read_bytes()

    done = dmbridge("run", "-c", str(config_path))

    assert done.returncode == 2
    assert done.stderr == ("dmbridge: config key 'logging.level': must be DEBUG, INFO, WARNING "
                           "or ERROR, got 'LOUD'\n")
    assert config_path.read_bytes() == before


YAML_ERRORS = {
    "tab": (
        lambda text: text.replace("    port: 29340", "\tport: 29340"),
        "\tport: 29340", 1,
        "found character '\\t' that cannot start any token (while scanning for the next token)",
    ),
    "unclosed quote": (
        lambda text: text + 'extra: "unclosed\n', 'extra: "unclosed', None,
        "found unexpected end of stream (while scanning a quoted scalar at line {line}, "
        "column 8)",
    ),
}


@pytest.mark.parametrize(("change", "culprit", "column", "problem"), YAML_ERRORS.values(),
                         ids=YAML_ERRORS.keys())
def test_yaml_error_is_one_line_with_line_and_column(
    config_path: Path, change: Callable[[str], str], culprit: str, column: int | None,
    problem: str
) -> None:
    config_path.write_text(change(config_path.read_text()))
    before = config_path.read_bytes()
    line = config_path.read_text().splitlines().index(culprit) + 1
    where = f"line {line}, column {column}" if column else f"line {line + 1}, column 1"

    done = dmbridge("run", "-c", str(config_path))

    assert done.returncode == 2
    assert done.stderr == (f"dmbridge: config key '(file)': {config_path} is not valid YAML, "
                           f"{where}: {problem.format(line=line)}\n")
    assert config_path.read_bytes() == before


def test_a_section_of_the_wrong_kind_is_one_line(config_path: Path) -> None:
    def scalar(data: Any) -> None:
        data["rate_limits"]["room_creation"] = 5

    edit(config_path, scalar)
    done = dmbridge("run", "-c", str(config_path))
    assert done.returncode == 2
    assert done.stderr == (
        f"dmbridge: config key 'rate_limits.room_creation' ({config_path}, line "
        f"{line_of(config_path, 'room_creation:')}): must be a mapping of keys, got 5\n"
    )


# --- the upgrade keeps every key ------------------------------------------------------------


def leaves(data: Any, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in leaves(value, (*path, key)).items()}
    if isinstance(data, list) and any(isinstance(item, dict) for item in data):
        return {k: v for i, item in enumerate(data) for k, v in leaves(item, (*path, i)).items()}
    return {path: data}


def test_the_upgrade_keeps_every_key_the_user_wrote(config_path: Path) -> None:
    def customise(data: Any) -> None:
        del data["api"]  # makes the upgrade write the file
        data["appservice"]["listener"]["max_connections"] = 100
        network = data["networks"][0]
        del network["quotas"]["message_burst"]
        del network["displayname"]
        network["delivery"] = {"mode": "webhook", "url": "http://127.0.0.1:9/hook",
                               "secret": "s" * 20}
        second = {"id": "sms", "tokens": ["t" * 20], "ghost_localpart": "sms_{remote_id}",
                  "quotas": {"new_dms_per_hour": 5}}
        data["networks"].append(second)

    edit(config_path, customise)
    written = leaves(YAML(typ="safe").load(config_path))

    settings = open_config(config_path, environ={}, upgrade=True)

    upgraded = leaves(YAML(typ="safe").load(config_path))
    assert {k: upgraded.get(k) for k in written} == written
    assert upgraded[("api", "max_body_bytes")] == 131072
    assert [n.id for n in settings.networks] == ["example", "sms"]


def test_the_upgrade_refuses_to_drop_a_key(config_path: Path) -> None:
    """If a key the example lacks reached the upgrade, it would stop rather than drop it."""
    config = Config(config_path)
    config.load()
    config["appservice"]["prot"] = 18091
    with pytest.raises(ConfigError) as info:
        config.update(save=False)
    assert info.value.key == "appservice.prot"
    assert "would be lost by the upgrade" in str(info.value)


def test_a_variable_outside_the_sections_is_left_alone(config_path: Path) -> None:
    environ = {"DMBRIDGE_CACHE": "/tmp/x", "DMBRIDGE_LOGING__LEVEL": "DEBUG",
               "DMBRIDGE_NETWORKS__0__TOKENS__0": "from-the-environment-0123"}
    settings = open_config(config_path, environ=environ)
    assert settings.log_level == "INFO"
    assert settings.networks.get("example").tokens == ("from-the-environment-0123",)


def test_an_empty_section_takes_the_defaults(config_path: Path) -> None:
    text = config_path.read_text()
    start = text.index("rate_limits:\n")
    end = text.index("\n\n", start)
    config_path.write_text(text[:start] + "rate_limits:\n" + text[end:])
    settings = open_config(config_path, environ={}, upgrade=True)
    assert settings.rate_limits.room_burst == 10
    assert "        burst: 10" in config_path.read_text()


def test_a_variable_naming_a_whole_section_is_refused(config_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={"DMBRIDGE_RATE_LIMITS__ROOM_CREATION": "5"})
    assert str(info.value) == (
        "config key 'rate_limits.room_creation' (DMBRIDGE_RATE_LIMITS__ROOM_CREATION): is a "
        "section: set its keys one by one, as DMBRIDGE_RATE_LIMITS__ROOM_CREATION__PER_SECOND"
    )


def test_a_key_that_is_not_a_name_is_unknown(config_path: Path) -> None:
    text = config_path.read_text()
    config_path.write_text(text + "? [a, b]\n: 1\n")
    with pytest.raises(ConfigError) as info:
        open_config(config_path, environ={})
    line = len(text.splitlines()) + 1
    assert str(info.value).startswith(
        f"config key '('a', 'b')' ({config_path}, line {line}): unknown key; known keys here: "
        "homeserver, appservice,"
    )
