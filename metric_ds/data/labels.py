"""Label encoding: original labels <-> 0..C-1 in a stable (sorted) order, saved as ``labels.json``."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


class LabelMap:
    """Sorted label names (ints numerically, strings lexicographically) and their ids.

    Args:
        names: the distinct labels, in id order.
    """

    def __init__(self, names: Iterable[Any]):
        self.names: list[Any] = list(names)
        self._index = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def from_labels(cls, labels: Iterable[Any]) -> LabelMap:
        return cls(sorted(set(labels)))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __contains__(self, label: Any) -> bool:
        return label in self._index

    def encode(self, labels: Iterable[Any]) -> np.ndarray:
        """Ids of ``labels``; raises KeyError for a label outside the map (callers check first)."""
        return np.fromiter((self._index[v] for v in labels), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> list[Any]:
        return [self.names[int(i)] for i in ids]

    def to_json(self) -> dict[str, Any]:
        return {"names": self.names, "type": "int" if all(isinstance(n, int) for n in self.names) else "str"}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, default=int))

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        data = json.loads(Path(path).read_text())
        return cls(data["names"])
