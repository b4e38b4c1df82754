"""The keys a config may hold, and the check of a file and the environment against them.

The packaged example is the one list of keys: a key added to it is known. A list of mappings
(``networks``) may hold in each item its example item's keys and those declared for it (keys a
network may leave out, so the example need not show them).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias


@dataclass(frozen=True)
class Items:
    """A list whose items are mappings of known keys."""

    keys: Keys


Keys: TypeAlias = "dict[str, Node]"
Node: TypeAlias = "Keys | Items | None"  # None: a value (a scalar, or a list of scalars)


@dataclass(frozen=True)
class Finding:
    """A key the config may not hold, or a section of the wrong kind."""

    key: str
    """As validation names keys: ``appservice.prot``, ``networks[0].delivry``."""
    where: str
    """``config.yaml, line 21``, or the environment variable."""
    problem: str


def known_keys(example: Mapping[str, Any], declared: Mapping[str, Mapping[str, Any]]) -> Keys:
    """The example's keys; ``declared`` adds keys to the items of the lists it names."""
    keys: Keys = {}
    for key, value in example.items():
        if isinstance(value, Mapping):
            keys[key] = known_keys(value, {})
        elif isinstance(value, list) and (
            key in declared or any(isinstance(item, Mapping) for item in value)
        ):
            item_keys = _declared(declared.get(key, {}))
            for item in value:
                if isinstance(item, Mapping):
                    _add(item_keys, known_keys(item, {}))
            keys[key] = Items(item_keys)
        else:
            keys[key] = None
    return keys


def _declared(declared: Mapping[str, Any]) -> Keys:
    return {k: _declared(v) if isinstance(v, Mapping) else None for k, v in declared.items()}


def _add(into: Keys, more: Keys) -> None:
    for key, node in more.items():
        have = into.get(key)
        if isinstance(have, dict) and isinstance(node, dict):
            _add(have, node)
        elif have is None:
            into[key] = node


def check_file(data: Mapping[Any, Any], keys: Keys, file: str) -> list[Finding]:
    """Every key of the file that is not known, and every section of the wrong kind.

    Outside lists of items, sections are merged key by key with the example's on upgrade, so
    they must be mappings (or empty); an item's own keys of the wrong kind are left for
    validation to name.
    """
    found: list[Finding] = []
    _check_mapping(data, keys, (), file, keys, True, found)
    return found


def _check_mapping(data: Mapping[Any, Any], keys: Keys, path: tuple[str | int, ...], file: str,
                   root: Keys, merged: bool, found: list[Finding]) -> None:
    for key, value in data.items():
        here = (*path, key if isinstance(key, str) else str(key))
        line = _line(data, key)
        where = f"{file}, line {line}" if line else file
        if not isinstance(key, str) or key not in keys:
            hint = _hint(str(key), keys, root)
            found.append(Finding(dotted(here), where, "unknown key; " + _file_hint(hint)))
            continue
        node = keys[key]
        if isinstance(node, dict):
            if isinstance(value, Mapping):
                _check_mapping(value, node, here, file, root, merged, found)
            elif value is not None and merged:
                found.append(Finding(dotted(here), where,
                                     f"must be a mapping of keys, got {value!r}"))
        elif isinstance(node, Items):
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, Mapping):
                        _check_mapping(item, node.keys, (*here, i), file, root, False, found)
            elif merged:
                found.append(Finding(dotted(here), where, f"must be a list, got {value!r}"))


def check_env(environ: Mapping[str, str], keys: Keys, prefix: str) -> list[Finding]:
    """Every ``PREFIX_SECTION__...`` variable naming a key that is not known, or a section.

    Variables whose first part is not a section belong to someone else and are not looked at;
    list indexes and paths into plain values are left to the code that applies them.
    """
    found: list[Finding] = []
    for name in sorted(environ):
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].lower().split("__")
        if parts[0] not in keys:
            continue
        node: Node = keys
        for i, part in enumerate(parts):
            if isinstance(node, Items):
                node = node.keys  # this part is the item's index
                continue
            if not isinstance(node, dict):
                break
            if part not in node:
                hint = _hint(part, node, keys)
                found.append(Finding(dotted(tuple(int(p) if p.isdigit() else p
                                                  for p in parts[: i + 1])),
                                     name, "unknown key; " + _env_hint(hint, parts, i, prefix)))
                break
            node = node[part]
        else:
            if isinstance(node, dict) and node:
                example = f"{name}__{next(iter(node)).upper()}"
                found.append(Finding(dotted(tuple(int(p) if p.isdigit() else p for p in parts)),
                                     name, f"is a section: set its keys one by one, as {example}"))
    return found


def dotted(path: tuple[str | int, ...]) -> str:
    """``("networks", 0, "delivery")`` as ``networks[0].delivery``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _line(data: Any, key: Any) -> int | None:
    try:
        return int(data.lc.key(key)[0]) + 1
    except (AttributeError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class _Hint:
    sibling: str | None  # a known key at the same level, close to the unknown one
    elsewhere: tuple[str, ...] | None  # the same name at another level, outside lists
    known: tuple[str, ...]  # the keys of that level


def _hint(name: str, keys: Keys, root: Keys) -> _Hint:
    close = difflib.get_close_matches(name.lower(), list(keys), n=1)
    elsewhere = next((p for p in _paths(root, ()) if p[-1] == name.lower()), None)
    return _Hint(close[0] if close else None, elsewhere, tuple(keys))


def _paths(keys: Keys, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    for key, node in keys.items():
        yield (*path, key)
        if isinstance(node, dict):
            yield from _paths(node, (*path, key))


def _file_hint(hint: _Hint) -> str:
    if hint.sibling:
        return f"did you mean `{hint.sibling}`?"
    if hint.elsewhere:
        return f"did you mean `{dotted(hint.elsewhere)}`?"
    return "known keys here: " + ", ".join(hint.known)


def _env_hint(hint: _Hint, parts: list[str], i: int, prefix: str) -> str:
    if hint.sibling:
        fixed = [*parts[:i], hint.sibling, *parts[i + 1 :]]
    elif hint.elsewhere:
        fixed = [*hint.elsewhere, *parts[i + 1 :]]
    else:
        return "known keys there: " + ", ".join(hint.known)
    return f"did you mean {prefix}{'__'.join(fixed).upper()}?"
