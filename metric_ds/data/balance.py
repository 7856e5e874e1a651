"""Class balancing of the train split: upsample small classes, downsample large ones (deterministic)."""
from __future__ import annotations

import numpy as np

from metric_ds.data.labels import LABEL_FREE


def balance_indices(labels: np.ndarray, upsample: int | None, downsample: int | None, seed: int) -> np.ndarray:
    """Row positions after balancing.

    Downsampling keeps a random ``downsample`` rows (without replacement) of each larger class; upsampling
    keeps every row of each smaller class and adds rows drawn with replacement up to ``upsample``. Classes
    already within the bounds are untouched. Upsampled rows are repeats of real rows (same text), so a pk or
    random batch may hold two copies of a row. Label-free rows (:data:`~metric_ds.data.labels.LABEL_FREE`) are
    no class: each is kept once.

    Args:
        labels: class of each row, shape (N,).
        upsample: the least rows per class, or None.
        downsample: the most rows per class, or None.
        seed: makes the result deterministic.

    Returns:
        Sorted positions into ``labels`` (with repeats where upsampled).
    """
    for name, value in (("upsample", upsample), ("downsample", downsample)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive number of rows per class, got {value}")
    if upsample is not None and downsample is not None and upsample > downsample:
        raise ValueError(f"upsample ({upsample}) must be <= downsample ({downsample})")
    labels = np.asarray(labels)
    if upsample is None and downsample is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    out = [np.zeros(0, dtype=np.int64), np.flatnonzero(labels == LABEL_FREE)]
    for cls in np.unique(labels[labels != LABEL_FREE]):
        idx = np.flatnonzero(labels == cls)
        if downsample is not None and len(idx) > downsample:
            idx = np.sort(rng.choice(idx, size=downsample, replace=False))
        if upsample is not None and len(idx) < upsample:
            extra = rng.choice(idx, size=upsample - len(idx), replace=True)
            idx = np.concatenate([idx, extra])
        out.append(idx)
    return np.sort(np.concatenate(out))
