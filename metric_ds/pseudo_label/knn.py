"""The ``knn`` method: label propagation by a vote of each unlabelled row's ``neighbours`` nearest labelled rows
(cosine on unit rows); the row takes the top label when its vote share beats the runner-up's by at least
``margin``, with the top share as its confidence."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metric_ds.pseudo_label.assign import Assignment
from metric_ds.pseudo_label.settings import Settings


def assign_by_knn(x: np.ndarray, y: np.ndarray, num_classes: int, neighbours: int, margin: float,
                  chunk: int = 4096) -> Assignment:
    """Each unlabelled row's ``neighbours`` nearest labelled rows (cosine on unit rows) vote; the row takes the
    top label when its vote share beats the runner-up's by at least ``margin`` (ties never pass a margin > 0)."""
    lab = np.flatnonzero(y >= 0)
    unl = np.flatnonzero(y < 0)
    labels = np.full(len(y), -1, dtype=np.int64)
    confidence = np.full(len(y), np.nan)
    k = min(neighbours, len(lab))
    if k == 0 or len(unl) == 0:
        return Assignment(labels, confidence)
    bank = np.ascontiguousarray(x[lab], dtype=np.float32)
    bank_y = y[lab]
    for start in range(0, len(unl), chunk):
        rows = unl[start:start + chunk]
        sims = np.ascontiguousarray(x[rows], dtype=np.float32) @ bank.T
        nn_idx = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < len(lab) else np.broadcast_to(
            np.arange(len(lab)), (len(rows), len(lab)))
        votes = np.zeros((len(rows), num_classes))
        np.add.at(votes, (np.repeat(np.arange(len(rows)), k), bank_y[nn_idx].ravel()), 1.0 / k)
        order = np.argsort(-votes, axis=1, kind="stable")
        top = votes[np.arange(len(rows)), order[:, 0]]
        second = votes[np.arange(len(rows)), order[:, 1]] if num_classes > 1 else np.zeros(len(rows))
        ok = top - second >= margin - 1e-12
        labels[rows[ok]] = order[ok, 0]
        confidence[rows[ok]] = top[ok]
    return Assignment(labels, confidence)


@dataclass
class KnnAssigner:
    """:func:`assign_by_knn` behind the :class:`~metric_ds.pseudo_label.assign.Assigner` interface."""

    x: np.ndarray
    num_classes: int
    neighbours: int
    margin: float

    @classmethod
    def fit(cls, x: np.ndarray, num_classes: int, settings: Settings) -> KnnAssigner:
        """Nothing to fit: the labelled rows vote at :meth:`assign`."""
        return cls(x, num_classes, settings.neighbours, settings.margin)

    def assign(self, y: np.ndarray) -> Assignment:
        return assign_by_knn(self.x, y, self.num_classes, self.neighbours, self.margin)
