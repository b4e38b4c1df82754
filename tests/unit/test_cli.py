"""The command line: help, generate, and how a bad config is reported."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from dmbridge.__main__ import main


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["--help"], "usage: dmbridge [-h] COMMAND"),
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
def test_forget_needs_one_user(tmp_path: Path, args: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["forget", "-c", _forget_config(tmp_path), *args])
    assert str(info.value).startswith("dmbridge: ")
