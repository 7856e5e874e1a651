"""Label encoding: original labels <-> 0..C-1 in a stable (sorted) order, saved as ``labels.json``.

A label-free row (null label, ``metric_mask = 1``, ``classifier_mask = 0``: see ``docs/data.md``) has no class
in the map; its ``label_id`` is :data:`LABEL_FREE`, which the batch's ``labels`` tensor carries to the loss.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# The label_id of a label-free row: no class. Never a valid class id, so CE or a class count that met it would fail.
LABEL_FREE = -1


def native(v: Any) -> Any:
    """A NumPy scalar as the Python value it holds (labels and cells compare and print as users wrote them)."""
    return v.item() if isinstance(v, np.generic) else v


def unseen_labels(values: Iterable[Any], label_map: LabelMap, what: str) -> str | None:
    """The message for labels of a table that ``label_map`` does not know, or None when it knows them all.

    Args:
        values: the table's labels.
        label_map: the known labels (of the training data, or of a trained model).
        what: the start of the message, naming the file and where the known labels come from, e.g.
            ``"val.csv: validation labels not in the training data (train.csv)"``.
    """
    unseen = sorted({native(v) for v in values if v not in label_map}, key=str)
    if not unseen:
        return None
    hint = ""
    kinds = {type(v).__name__ for v in unseen} | {type(n).__name__ for n in label_map.names}
    if len(kinds) > 1:
        hint = f" (the known labels are {type(label_map.names[0]).__name__}s, these are not)"
    return f"{what}: {', '.join(map(str, unseen[:10]))}{' ...' if len(unseen) > 10 else ''}{hint}"


class LabelMap:
    """Sorted label names (ints numerically, strings lexicographically) and their ids.

    ``labels.json`` keeps the labels' type: ``{"type": "int", "names": [2, 10, 33]}`` or
    ``{"type": "str", "names": ["card_lost", ...]}``.

    Args:
        names: the distinct labels, in id order.
    """

    def __init__(self, names: Iterable[Any]):
        self.names: list[Any] = [native(n) for n in names]
        self._index = {name: i for i, name in enumerate(self.names)}
        if len(self._index) != len(self.names):
            raise ValueError("LabelMap: label names must be distinct")

    @classmethod
    def from_labels(cls, labels: Iterable[Any]) -> LabelMap:
        """The map of the distinct ``labels``, sorted.

        Raises:
            ValueError: labels of mixed types (validate the table first: it names the rows).
        """
        distinct = {native(v) for v in labels}
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
        return native(label) in self._index

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
        labels = [native(v) for v in labels]
        try:
            return np.fromiter((self._index[v] for v in labels), dtype=np.int64, count=len(labels))
        except KeyError:
            unknown = sorted({repr(v) for v in labels if v not in self._index})
            raise KeyError(f"labels not in the label map: {', '.join(unknown[:10])}") from None

    def encode_or_free(self, labels: pd.Series) -> np.ndarray:
        """Ids (int64) of ``labels``, with :data:`LABEL_FREE` for the null labels of label-free rows."""
        ids = np.full(len(labels), LABEL_FREE, dtype=np.int64)
        known = labels.notna().to_numpy()
        ids[known] = self.encode(labels[known])
        return ids

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
