"""The command line: help, generate, and how a bad config is reported."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from dmbridge.__main__ import main, parser


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["--help"], "usage: dmbridge [-h] [--version] COMMAND"),
        (["generate", "--help"], "usage: dmbridge generate"),
        (["run", "--help"], "usage: dmbridge run"),
        (["demo", "--help"], "usage: dmbridge demo"),
        (["send", "--help"], "usage: dmbridge send"),
        (["list-dms", "--help"], "usage: dmbridge list-dms"),
        (["forget", "--help"], "usage: dmbridge forget"),
    ],
)
def test_help(capsys: pytest.CaptureFixture[str], argv: list[str], usage: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(usage)
    assert "-h, --help" in out


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("generate", "run", "demo", "send", "list-dms"):
        assert command in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, registration = tmp_path / "conf" / "config.yaml", tmp_path / "registration.yaml"
    code = main([
        "generate", "-c", str(config), "-r", str(registration), "--domain", "example.net",
        "--homeserver", "https://matrix.example.net", "--port", "8081",
        "--address", "http://bridge:8081", "--database", "sqlite:state.db",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert f"wrote {config} and {registration}" in out
    assert "app_service_config_files" in out

    written = YAML(typ="safe").load(config)
    assert written["homeserver"] == {
        "address": "https://matrix.example.net", "domain": "example.net",
    }
    assert written["appservice"]["port"] == 8081
    assert written["appservice"]["address"] == "http://bridge:8081"
    assert written["database"]["url"] == "sqlite:state.db"
    assert written["appservice"]["as_token"] != "generate"

    reg = YAML(typ="safe").load(registration)
    assert reg["url"] == "http://bridge:8081"
    assert reg["as_token"] == written["appservice"]["as_token"]
    assert {ns["regex"] for ns in reg["namespaces"]["users"]} == {
        r"^@dm_example_.+:example\.net$", r"^@dmbridge_bot:example\.net$",
    }


def test_generate_with_a_bad_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, registration = tmp_path / "config.yaml", tmp_path / "registration.yaml"
    code = main(["generate", "-c", str(config), "-r", str(registration),
                 "--homeserver", "ftp://matrix.example.net"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("dmbridge: config key 'homeserver.address': must be an http(s) URL")
    assert not registration.exists()


def test_run_with_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    assert main(["generate", "-c", str(config), "-r", str(tmp_path / "reg.yaml")]) == 0
    capsys.readouterr()
    yaml = YAML()
    data = yaml.load(config)
    data["logging"]["level"] = "LOUD"
    yaml.dump(data, config)

    assert main(["run", "-c", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "dmbridge: config key 'logging.level': must be DEBUG, INFO, WARNING or ERROR, "
        "got 'LOUD'\n"
    )
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_run_without_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "config.yaml"
    assert main(["run", "-c", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dmbridge: config key '(file)': ")
    assert "`dmbridge generate`" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == "dmbridge 0.1.0\n"


def test_every_command_and_option_is_described() -> None:
    [commands] = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    described = {c.dest for c in commands._choices_actions if c.help}
    assert described == set(commands.choices)
    for name, command in commands.choices.items():
        assert command.description, name
        for action in command._actions:
            assert action.help, (name, action.option_strings)


def test_retry_and_retry_all_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["dead-letters", "--retry", "1", "--retry-all"])
    assert info.value.code == 2
    assert "argument --retry-all: not allowed with argument --retry" in capsys.readouterr().err


@pytest.fixture
def config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A config whose bridge is not running (its port is closed)."""
    path = tmp_path / "config.yaml"
    assert main(["generate", "-c", str(path), "-r", str(tmp_path / "reg.yaml"),
                 "--port", "9", "--address", "http://127.0.0.1:9"]) == 0
    capsys.readouterr()
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("dmbridge: ")
    return line


@pytest.mark.parametrize("argv", [
    ["send", "--network", "nope", "--sender", "a", "--to", "@b:example.org", "--text", "hi"],
    ["list-dms", "--network", "nope"],
    ["dead-letters", "--network", "nope"],
    ["dead-letters", "--network", "nope", "--retry-all"],
    ["clear-declined", "--network", "nope", "--remote-id", "a", "--user", "@b:example.org"],
])
def test_an_unknown_network(config: Path, capsys: pytest.CaptureFixture[str],
                            argv: list[str]) -> None:
    assert main([*argv, "-c", str(config)]) == 1
    assert _one_line_error(capsys) == "dmbridge: no network 'nope' is configured"


@pytest.mark.parametrize("argv", [
    ["send", "--network", "example", "--sender", "a", "--to", "@b:example.org", "--text", "hi"],
    ["list-dms"],
    ["dead-letters", "--retry", "3"],
])
def test_a_bridge_that_is_not_running(config: Path, capsys: pytest.CaptureFixture[str],
                                      argv: list[str]) -> None:
    assert main([*argv, "-c", str(config)]) == 1
    line = _one_line_error(capsys)
    assert line.startswith("dmbridge: the bridge is not reachable at http://127.0.0.1:9/"), line
    assert f"is `dmbridge run` running with {config}?" in line


def test_remote_id_needs_a_network(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list-dms", "-c", str(config), "--remote-id", "a"]) == 2
    assert _one_line_error(capsys) == "dmbridge: --remote-id needs --network"


def test_generate_into_a_folder_that_does_not_exist(tmp_path: Path) -> None:
    config, registration = tmp_path / "a" / "config.yaml", tmp_path / "b" / "c" / "reg.yaml"
    assert main(["generate", "-c", str(config), "-r", str(registration)]) == 0
    assert config.is_file() and registration.is_file()


@pytest.mark.parametrize("which", ["-c", "-r"])
def test_generate_where_a_folder_cannot_be(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           which: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    paths = {"-c": str(tmp_path / "config.yaml"), "-r": str(tmp_path / "reg.yaml")}
    paths[which] = str(blocker / "sub" / "x.yaml")
    assert main(["generate", "-c", paths["-c"], "-r", paths["-r"]]) == 2
    assert _one_line_error(capsys).startswith(
        f"dmbridge: config key '(file)': the folder {blocker / 'sub'} cannot be created: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_generate_into_a_read_only_folder(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    assert main(["generate", "-c", str(folder / "config.yaml"), "-r",
                 str(folder / "reg.yaml")]) == 2
    assert _one_line_error(capsys) == (
        f"dmbridge: config key '(file)': {folder / 'config.yaml'} cannot be written: "
        "Permission denied")


def test_a_database_that_cannot_be_opened(config: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    yaml = YAML()
    data = yaml.load(config)
    data["database"]["url"] = f"sqlite:///{config.parent}/missing/dmbridge.db"
    yaml.dump(data, config)
    assert main(["clear-declined", "-c", str(config), "--network", "example",
                 "--remote-id", "a", "--user", "@b:example.org"]) == 1
    assert "the folder" in _one_line_error(capsys)


def test_ctrl_c_is_one_line(monkeypatch: pytest.MonkeyPatch, config: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(main: Coroutine[Any, Any, Any]) -> None:
        main.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(asyncio, "run", interrupted)
    assert main(["list-dms", "-c", str(config)]) == 130
    assert _one_line_error(capsys) == "dmbridge: interrupted"


def _forget_config(tmp_path: Path) -> str:
    from tests.support.settings import make_settings

    make_settings(tmp_path, homeserver_url="http://127.0.0.1:9", domain="example.org",
                  port=29399, db_url=f"sqlite:///{tmp_path / 'dmbridge.db'}")
    return str(tmp_path / "config.yaml")


@pytest.mark.parametrize(("args", "error"), [
    (["--matrix-user", "@nobody:example.org"],
     "dmbridge: the bridge knows nothing of @nobody:example.org: no DM, no ghost"),
    (["--matrix-user", "nobody"], "dmbridge: 'nobody' is not a Matrix user ID (@user:server)"),
    (["--network", "chat", "--remote-id", "nobody"],
     "dmbridge: the bridge knows nothing of chat user nobody: no DM, no ghost"),
    (["--network", "nowhere", "--remote-id", "x"],
     "dmbridge: no network 'nowhere' is configured"),
    (["--network", "sms", "--remote-id", "not-a-number"],
     "dmbridge: 'not-a-number' is not a valid sms user ID"),
])
def test_forget_refuses_an_unknown_or_bad_user_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], error: str) -> None:
    code = main(["forget", "-c", _forget_config(tmp_path), "--yes", *args])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(error) and err.count("\n") == 1, err


@pytest.mark.parametrize("args", [[], ["--network", "chat"],
                                  ["--matrix-user", "@a:example.org", "--remote-id", "x"]])
def test_forget_needs_one_user(tmp_path: Path, args: list[str],
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["forget", "-c", _forget_config(tmp_path), *args]) == 2
    assert _one_line_error(capsys).startswith("dmbridge: ")
