"""``metric-ds validate``'s summary of the data a config points to."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from metric_ds.config import Config
from metric_ds.data.pipeline import TrainingData


def _log_comb(n: int, k: int) -> float:
    if k < 0 or k > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def expected_anchor_pos_fraction(labels: np.ndarray, metric_mask: np.ndarray, n_rows: int, batch_size: int) -> float:
    """Expected share of SupCon anchors with at least one positive in a uniformly random batch.

    For an anchor of class c with n_c metric rows among ``n_rows`` rows, the other ``b - 1`` rows of its batch
    are drawn without replacement from the ``n_rows - 1`` others, so (hypergeometric)
    P(no positive) = C(n_rows - n_c, b - 1) / C(n_rows - 1, b - 1). Averaged over metric rows.
    """
    metric_labels = labels[metric_mask.astype(bool)]
    if len(metric_labels) == 0:
        return 0.0
    b = min(batch_size, n_rows)
    _, counts = np.unique(metric_labels, return_counts=True)
    total = 0.0
    for n_c in counts:
        p_none = math.exp(_log_comb(n_rows - n_c, b - 1) - _log_comb(n_rows - 1, b - 1))
        total += n_c * (1.0 - p_none)
    return total / len(metric_labels)


def summarize(data: TrainingData, cfg: Config) -> dict[str, Any]:
    """Counts and the expected positive coverage of SupCon anchors at this batch size."""
    train, val = data.train, data.val
    per_class = train["label_id"].value_counts()
    labels, metric = train["label_id"].to_numpy(), train["metric_mask"].to_numpy()
    if cfg.data.sampler == "pk":
        frac = 1.0 if cfg.data.samples_per_class and cfg.data.samples_per_class >= 2 else 0.0
    else:
        frac = expected_anchor_pos_fraction(labels, metric, len(train), cfg.training.batch_size)
    return {
        "train_rows": len(train),
        "val_rows": len(val),
        "classes": data.label_map.num_classes,
        "metric_rows": int(train["metric_mask"].sum()),
        "classifier_rows": int(train["classifier_mask"].sum()),
        "both_masks_rows": int(((train["metric_mask"] == 1) & (train["classifier_mask"] == 1)).sum()),
        "rows_per_class_min": int(per_class.min()),
        "rows_per_class_median": float(per_class.median()),
        "rows_per_class_max": int(per_class.max()),
        "batch_size": cfg.training.batch_size,
        "sampler": cfg.data.sampler,
        "expected_anchor_pos_frac": frac,
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"rows: {s['train_rows']} train, {s['val_rows']} validation; {s['classes']} classes",
        f"masks (train): metric {s['metric_rows']}, classifier {s['classifier_rows']}, both {s['both_masks_rows']}",
        f"rows per class (train): min {s['rows_per_class_min']}, median {s['rows_per_class_median']:g}, "
        f"max {s['rows_per_class_max']}",
        f"SupCon anchors with >= 1 positive at batch size {s['batch_size']} ({s['sampler']} sampler): "
        f"{100 * s['expected_anchor_pos_frac']:.1f}% expected",
    ]
    return "\n".join(lines)
