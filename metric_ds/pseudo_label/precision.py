"""The precision estimate, which needs no gold label: a stratified share of the labelled rows is treated as
unlabelled (only the labels are hidden; a k-means clustering stays as it is), pseudo-labelled from the remaining
labelled rows, and scored against its own labels.

It assumes the labelled rows are a random draw of the data. With an embedding that never saw the labels (round 1)
it is close to the true precision (fewer labelled rows vote); with a model trained on the labelled rows (round 2,
``--model RUN/best``) it is optimistic, and the summary says so. Measured against gold labels:
``benchmarks/results/limited_labels.md`` and ``benchmarks/results/pseudo_sweep.md``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from metric_ds.pseudo_label.assign import Assignment


def holdout_rows(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified share of the labelled rows (``round(fraction x n_c)`` of class c, never its last row).

    Returns:
        Sorted row positions, shape (H,).
    """
    rng = np.random.default_rng(seed)
    out = [np.zeros(0, dtype=np.int64)]
    for cls in np.unique(y[y >= 0]):
        idx = np.flatnonzero(y == cls)
        take = min(int(round(fraction * len(idx))), len(idx) - 1)
        out.append(rng.permutation(idx)[:take])
    return np.sort(np.concatenate(out))


def estimate_precision(assign: Callable[[np.ndarray], Assignment], y: np.ndarray, fraction: float,
                       seed: int) -> dict[str, Any]:
    """Hide the labels of a held-out share of labelled rows, pseudo-label them with ``assign`` (a function of
    the label vector with -1 for unlabelled, e.g. an :class:`~metric_ds.pseudo_label.assign.Assigner`'s
    ``assign``), and score them.

    Returns:
        ``held_out`` rows, ``assigned`` of them, ``coverage`` (assigned / held out) and ``precision``
        (correct / assigned; None when nothing was assigned).
    """
    rows = holdout_rows(y, fraction, seed)
    if len(rows) == 0:
        return {"held_out": 0, "assigned": 0, "coverage": None, "precision": None}
    hidden = y.copy()
    hidden[rows] = -1
    pred = assign(hidden).labels[rows]
    assigned = pred >= 0
    correct = int((pred[assigned] == y[rows][assigned]).sum())
    return {"held_out": int(len(rows)), "assigned": int(assigned.sum()),
            "coverage": float(assigned.mean()),
            "precision": float(correct / assigned.sum()) if assigned.any() else None}
