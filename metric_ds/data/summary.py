"""``metric-ds validate``'s summary of the data a config points to."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from metric_ds.data.labels import LABEL_FREE, LabelMap
from metric_ds.data.pipeline import TrainingData

if TYPE_CHECKING:
    from metric_ds.config import Config


def _log_comb(n: int, k: int) -> float:
    if k < 0 or k > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def expected_anchor_pos_fraction(labels: np.ndarray, metric_mask: np.ndarray, n_rows: int, batch_size: int) -> float:
    """Expected share of SupCon anchors with at least one positive in a uniformly random batch.

    A batch is ``b = min(batch_size, n_rows)`` rows drawn without replacement from all ``n_rows`` rows (metric
    or not). For an anchor of class c with n_c metric rows, the other ``b - 1`` rows of its batch come from the
    ``n_rows - 1`` others, so (hypergeometric) P(no positive) = C(n_rows - n_c, b - 1) / C(n_rows - 1, b - 1).
    Averaged over metric rows.

    Args:
        labels: class of each row, shape (N,).
        metric_mask: 0/1 per row, shape (N,).
        n_rows: rows the batch is drawn from (N).
        batch_size: rows per batch.
    """
    labels, metric_mask = np.asarray(labels), np.asarray(metric_mask).astype(bool)
    metric_labels = labels[metric_mask]
    if len(metric_labels) == 0:
        return 0.0
    b = min(batch_size, n_rows)
    _, counts = np.unique(metric_labels, return_counts=True)
    total = 0.0
    for n_c in counts.tolist():
        p_none = math.exp(_log_comb(n_rows - n_c, b - 1) - _log_comb(n_rows - 1, b - 1))
        total += n_c * (1.0 - p_none)
    return total / len(metric_labels)


def pk_anchor_pos_fraction(labels: np.ndarray, metric_mask: np.ndarray) -> float:
    """Share of SupCon anchors with a positive under the pk sampler: the metric rows of classes with at
    least 2 metric rows (the sampler puts each of those with a positive; a class's single row has none)."""
    labels, metric_mask = np.asarray(labels), np.asarray(metric_mask).astype(bool)
    if not metric_mask.any():
        return 0.0
    _, counts = np.unique(labels[metric_mask], return_counts=True)
    return float(counts[counts >= 2].sum() / counts.sum())


def summarize_frame(train: pd.DataFrame, label_map: LabelMap, batch_size: int, sampler: str = "random",
                    val_rows: int = 0, warnings: list[str] | None = None) -> dict[str, Any]:
    """Counts of a train split and the expected positive coverage of SupCon anchors at this batch size.

    Label-free rows (:data:`~metric_ds.data.labels.LABEL_FREE`) are counted apart and in no class; the expected
    coverage is that of the labelled metric rows (a label-free row always has a positive: its second view).

    Args:
        train: the (balanced) train split, with ``label_id`` and the masks.
        label_map: its labels.
        batch_size: rows per batch of one process.
        sampler: ``random`` or ``pk``.
        val_rows: rows of the validation split.
        warnings: data warnings to show.
    """
    labels, metric = train["label_id"].to_numpy(dtype=np.int64), train["metric_mask"].to_numpy()
    free = labels == LABEL_FREE
    per_class = np.bincount(labels[~free], minlength=label_map.num_classes)
    if sampler == "pk":
        frac = pk_anchor_pos_fraction(labels[~free], metric[~free])
    else:
        frac = expected_anchor_pos_fraction(labels[~free], metric[~free], len(train), batch_size)
    return {
        "train_rows": len(train),
        "val_rows": int(val_rows),
        "classes": label_map.num_classes,
        "metric_rows": int(train["metric_mask"].sum()),
        "classifier_rows": int(train["classifier_mask"].sum()),
        "both_masks_rows": int(((train["metric_mask"] == 1) & (train["classifier_mask"] == 1)).sum()),
        "label_free_rows": int(free.sum()),
        "rows_per_class_min": int(per_class.min()),
        "rows_per_class_median": float(np.median(per_class)),
        "rows_per_class_max": int(per_class.max()),
        "batch_size": batch_size,
        "sampler": sampler,
        "expected_anchor_pos_frac": frac,
        "warnings": list(warnings or []),
    }


def summarize(data: TrainingData, cfg: Config) -> dict[str, Any]:
    """:func:`summarize_frame` for a config (:class:`metric_ds.config.Config`) and its loaded data."""
    return summarize_frame(data.train, data.label_map, cfg.training.batch_size, cfg.data.sampler,
                           val_rows=len(data.val), warnings=data.warnings)


def format_summary(s: dict[str, Any]) -> str:
    """The summary as lines of text for the terminal."""
    lines = [
        f"rows: {s['train_rows']} train, {s['val_rows']} validation; {s['classes']} classes",
        f"masks (train): metric {s['metric_rows']}, classifier {s['classifier_rows']}, both {s['both_masks_rows']}"
        + (f"; label-free {s['label_free_rows']} (metric rows without a label)" if s.get("label_free_rows") else ""),
        f"rows per class (train): min {s['rows_per_class_min']}, median {s['rows_per_class_median']:g}, "
        f"max {s['rows_per_class_max']}",
        f"SupCon anchors with >= 1 positive at batch size {s['batch_size']} ({s['sampler']} sampler): "
        f"{100 * s['expected_anchor_pos_frac']:.1f}% expected",
    ]
    lines += [f"warning: {w}" for w in s.get("warnings", [])]
    return "\n".join(lines)
