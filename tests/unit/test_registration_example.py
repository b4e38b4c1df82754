"""registration.yaml.example at the repo root matches what `dmbridge generate` writes."""

from __future__ import annotations

from pathlib import Path

from ruamel.yaml import YAML

from dmbridge.__main__ import generate

ROOT = Path(__file__).resolve().parents[2]


def test_registration_example_matches_the_generator(tmp_path: Path) -> None:
    config, registration = tmp_path / "config.yaml", tmp_path / "registration.yaml"
    generate(config, registration, {})
    made = YAML(typ="safe").load(registration.read_text())
    example = YAML(typ="safe").load((ROOT / "registration.yaml.example").read_text())
    for token in ("as_token", "hs_token"):
        assert example.pop(token).startswith("CHANGE_ME")
        assert len(made.pop(token)) >= 32
    assert example == made
    assert registration.stat().st_mode & 0o077 == 0, "tokens must not be world-readable"


def test_config_example_is_the_packaged_example() -> None:
    packaged = ROOT / "dmbridge" / "example-config.yaml"
    assert (ROOT / "config.example.yaml").read_text() == packaged.read_text()
