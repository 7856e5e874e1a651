"""Label encoding: original labels <-> 0..C-1 in a stable (sorted) order, saved as ``labels.json``."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


def _native(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


class LabelMap:
    """Sorted label names (ints numerically, strings lexicographically) and their ids.

    ``labels.json`` keeps the labels' type: ``{"type": "int", "names": [2, 10, 33]}`` or
    ``{"type": "str", "names": ["card_lost", ...]}``.

    Args:
        names: the distinct labels, in id order.
    """

    def __init__(self, names: Iterable[Any]):
        self.names: list[Any] = [_native(n) for n in names]
        self._index = {name: i for i, name in enumerate(self.names)}
        if len(self._index) != len(self.names):
            raise ValueError("LabelMap: label names must be distinct")

    @classmethod
    def from_labels(cls, labels: Iterable[Any]) -> LabelMap:
        """The map of the distinct ``labels``, sorted.

        Raises:
            ValueError: labels of mixed types (validate the table first: it names the rows).
        """
        distinct = {_native(v) for v in labels}
        try:
            return cls(sorted(distinct))
        except TypeError:
            kinds = sorted({type(v).__name__ for v in distinct})
            raise ValueError(f"labels of mixed types ({', '.join(kinds)}) cannot be ordered") from None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, label: Any) -> bool:
        return _native(label) in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self.names == other.names

    def __repr__(self) -> str:
        shown = ", ".join(map(repr, self.names[:5])) + (", ..." if len(self.names) > 5 else "")
        return f"LabelMap({self.num_classes} classes: {shown})"

    def encode(self, labels: Iterable[Any]) -> np.ndarray:
        """Ids (int64) of ``labels``.

        Raises:
            KeyError: naming the labels outside the map (callers that take user data check first).
        """
        labels = [_native(v) for v in labels]
        try:
            return np.fromiter((self._index[v] for v in labels), dtype=np.int64, count=len(labels))
        except KeyError:
            unknown = sorted({repr(v) for v in labels if v not in self._index})
            raise KeyError(f"labels not in the label map: {', '.join(unknown[:10])}") from None

    def decode(self, ids: Iterable[int]) -> list[Any]:
        """The original labels of ``ids``."""
        return [self.names[int(i)] for i in ids]

    def to_json(self) -> dict[str, Any]:
        kind = "int" if all(isinstance(n, int) for n in self.names) else "str"
        return {"type": kind, "names": self.names}

    def save(self, path: str | Path) -> None:
        """Write ``labels.json`` (UTF-8, labels as they were: ints stay ints)."""
        Path(path).write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        """Read a map written by :meth:`save`."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        names = data["names"]
        if data.get("type") == "int":
            names = [int(n) for n in names]
        return cls(names)
