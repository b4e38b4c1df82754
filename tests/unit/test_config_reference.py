"""The README's "Configuration reference" documents exactly the keys of the packaged example
(and those a network may hold), with their real defaults, and says which are required.

Worked out from the table and the example alone, so that it holds for any key added to both.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from dmbridge.__main__ import generate
from dmbridge.config import NETWORK_KEYS, Config, ConfigError, Need, open_config
from dmbridge.configkeys import Items, Keys

ROOT = Path(__file__).resolve().parents[2]
ITEM = "[]"  # in a path: any item of the list


def reference_rows() -> dict[str, str]:
    """Each documented key with its default cell."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Configuration reference\n")
    section = readme[start : readme.index("\n## ", start + 1)]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        key = cells[0].strip("`")
        assert key not in rows, f"{key} is documented twice"
        rows[key] = cells[2]
    assert rows, "no table found"
    return rows


def example() -> Any:
    return YAML(typ="safe").load((ROOT / "dmbridge" / "example-config.yaml").read_text())


def known() -> Keys:
    config = Config(ROOT / "unused.yaml")
    return config.known_keys()


def key_paths(keys: Keys, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key a row documents: values, and lists of items (`networks`) with their keys."""
    for key, node in keys.items():
        if isinstance(node, dict):
            yield from key_paths(node, (*path, key))
        elif isinstance(node, Items):
            yield (*path, key)
            yield from key_paths(node.keys, (*path, key, ITEM))
        else:
            yield (*path, key)


def name(path: tuple[str, ...]) -> str:
    return ".".join(path).replace(f".{ITEM}.", f"{ITEM}.")


def real_default(path: tuple[str, ...]) -> Any:
    """The example's value; inside a list item, the value the code uses when it is left out
    (NETWORK_KEYS for a network, else the example's first item's)."""
    value: Any = example()
    for i, part in enumerate(path):
        if part == ITEM and path[:i] == ("networks",):
            value = NETWORK_KEYS
        else:
            value = value[0] if part == ITEM else value[part]
    return value


PATHS = list(key_paths(known()))
ROWS = reference_rows()


def test_every_key_is_documented_and_every_documented_key_exists() -> None:
    documented, real = set(ROWS), {name(p) for p in PATHS}
    missing, extra = sorted(real - documented), sorted(documented - real)
    assert (missing, extra) == ([], []), "(undocumented keys, documented keys that do not exist)"


def test_every_network_key_has_its_default_declared() -> None:
    """A key of the example's network is read by the code: NETWORK_KEYS says its default."""

    def declared(keys: Keys, values: dict[str, Any], path: str) -> Iterator[str]:
        for key, node in keys.items():
            if key not in values:
                yield f"{path}.{key}"
            elif isinstance(node, dict):
                yield from declared(node, values[key], f"{path}.{key}")

    networks = known()["networks"]
    assert isinstance(networks, Items)
    assert list(declared(networks.keys, NETWORK_KEYS, "networks[]")) == []


def matches(cell: str, real: Any) -> bool:
    """The cell says ``required``, ``none``... as Need does, or shows the value in `code`.

    A key outside networks is never left out (the example's value fills in), but a value the
    bridge refuses ("generate") makes it required: ``required (example: `generate`)``.
    """
    for need in Need:
        if cell.startswith(need.value):
            if real is need or (need is Need.NONE and real is None):
                return True
            if need is not Need.REQUIRED or isinstance(real, Need):
                return False
    code = re.search(r"`([^`]*)`", cell)
    if code is None:
        return False
    if isinstance(real, str):  # templates and patterns are not YAML; "" is the empty string
        return code.group(1) == real or (code.group(1) == '""' and real == "")
    return bool(YAML(typ="safe").load(code.group(1)) == real)


LISTS_OF_ITEMS = {p[: p.index(ITEM)] for p in PATHS if ITEM in p}


@pytest.mark.parametrize("path", [p for p in PATHS if p not in LISTS_OF_ITEMS], ids=name)
def test_documented_default_is_the_real_one(path: tuple[str, ...]) -> None:
    cell, real = ROWS.get(name(path), "(undocumented)"), real_default(path)
    assert matches(cell, real), f"{name(path)}: documented {cell!r}, really {real!r}"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reference") / "config.yaml"
    generate(path, path.parent / "registration.yaml", {})
    return path


def required(config_path: Path, path: tuple[str, ...], tmp_path: Path) -> bool:
    """Whether the bridge refuses to start when the key is left out of the generated file."""
    data = YAML(typ="safe").load(config_path)
    parent = data
    for part in path[:-1]:
        parent = parent[0] if part == ITEM else parent[part]  # the example's first network
    if path[-1] not in parent:
        return False
    del parent[path[-1]]
    target = tmp_path / "config.yaml"
    YAML(typ="safe").dump(data, target)
    try:
        open_config(target, environ={})
    except ConfigError:
        return True
    return False


@pytest.mark.parametrize("path", [p for p in PATHS if p[-1] != ITEM], ids=name)
def test_required_keys_are_documented_as_required(
    generated: Path, tmp_path: Path, path: tuple[str, ...]
) -> None:
    documented = ROWS.get(name(path), "").startswith(Need.REQUIRED.value)
    assert required(generated, path, tmp_path) == documented


def test_a_network_of_its_required_keys_is_one_with_every_default(generated: Path,
                                                                    tmp_path: Path) -> None:
    """NETWORK_KEYS holds the defaults the code uses."""

    def defaults(keys: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in keys.items():
            if isinstance(value, dict):
                out[key] = defaults(value)
            elif value is Need.ID:
                out[key] = "example"
            elif not isinstance(value, Need):
                out[key] = copy.deepcopy(value)
        return out

    data = YAML(typ="safe").load(generated)
    first = data["networks"][0]
    short = {k: first[k] for k, v in NETWORK_KEYS.items() if v is Need.REQUIRED}
    full = {**defaults(NETWORK_KEYS), **short}
    loaded = []
    for network in (short, full):
        data["networks"] = [network]
        YAML(typ="safe").dump(data, tmp_path / "config.yaml")
        loaded.append(open_config(tmp_path / "config.yaml", environ={}).networks.get("example"))
    assert loaded[0] == loaded[1]
    assert loaded[0].name == "example"
