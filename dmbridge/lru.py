"""A dict that keeps at most ``maxsize`` entries, dropping the least recently used.

For the bridge's caches of per-ghost and per-room things (and mautrix's, which are plain dicts:
being a dict, this one can stand in for them). Reading an entry (``d[key]``, ``d.get(key)``)
or writing it makes it the most recent; writing a new key past ``maxsize`` drops the oldest.
Only what is cheap to rebuild belongs in one: an evicted entry must be made again on demand.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, TypeVar, overload

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D")


class LRU(OrderedDict[K, V]):
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"an LRU needs room for at least one entry, not {maxsize}")
        super().__init__()
        self.maxsize = maxsize

    def __getitem__(self, key: K) -> V:
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    @overload
    def get(self, key: K, default: None = None) -> V | None: ...
    @overload
    def get(self, key: K, default: V | D) -> V | D: ...

    def get(self, key: K, default: Any = None) -> Any:
        # dict.get does not go through __getitem__: without this a read would not count.
        if key in self:
            return self[key]
        return default

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)
