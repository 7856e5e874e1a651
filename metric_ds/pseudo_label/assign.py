"""The interface every pseudo-labelling method shares: an :class:`Assigner` is fixed to one set of embeddings;
given the label of each row (-1: unlabelled), it returns an :class:`Assignment` of the unlabelled rows.

Assigning is separate from fitting so that the precision estimate (:mod:`~metric_ds.pseudo_label.precision`)
can hide some labels and assign again without clustering again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class Assignment:
    """Pseudo-labels of the unlabelled rows.

    Attributes:
        labels: class id per row (-1: rejected, or a labelled row), shape (N,).
        confidence: purity (kmeans) or top vote share (knn) per row; NaN where rejected.
        groups: per-cluster statistics (kmeans) for the summary: support, purity, majority class.
    """

    labels: np.ndarray
    confidence: np.ndarray
    groups: list[dict[str, Any]] = field(default_factory=list)


class Assigner(Protocol):
    """A pseudo-labelling method fitted to the embeddings of every row."""

    def assign(self, y: np.ndarray) -> Assignment:
        """Pseudo-label the rows with ``y == -1`` from the labelled ones.

        Args:
            y: class id per row, -1 for unlabelled, shape (N,).
        """
        ...
