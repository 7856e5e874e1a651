"""Pseudo-label a table from its embeddings: fit the chosen method, assign, estimate the precision, and build the
output table and the summary."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from metric_ds.pseudo_label.assign import Assigner
from metric_ds.pseudo_label.kmeans import KMeansAssigner
from metric_ds.pseudo_label.knn import KnnAssigner
from metric_ds.pseudo_label.precision import estimate_precision
from metric_ds.pseudo_label.settings import Settings
from metric_ds.pseudo_label.summary import build_summary
from metric_ds.pseudo_label.table import output_table

# ``settings.method`` -> how to fit its assigner to the embeddings of every row
ASSIGNERS: dict[str, Callable[[np.ndarray, int, Settings], Assigner]] = {
    "kmeans": KMeansAssigner.fit,
    "knn": KnnAssigner.fit,
}


def pseudo_label_frame(df: pd.DataFrame, x: np.ndarray, y: np.ndarray, classes: list,
                       settings: Settings) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Pseudo-label the rows of ``df`` from their embeddings ``x`` and labels ``y`` (-1 unlabelled).

    Returns:
        ``(table, summary)``: the training table (:func:`~metric_ds.pseudo_label.table.output_table`) and the
        summary (:func:`~metric_ds.pseudo_label.summary.build_summary`).
    """
    assigner = ASSIGNERS[settings.method](x, len(classes), settings)
    result = assigner.assign(y)
    estimate = estimate_precision(assigner.assign, y, settings.holdout_fraction, settings.seed)
    table, counts = output_table(df, y, result, classes, settings)
    return table, build_summary(y, result, classes, settings, estimate, counts)
