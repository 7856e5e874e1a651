"""Class balancing of the train split: upsample small classes, downsample large ones (deterministic)."""
from __future__ import annotations

import numpy as np


def balance_indices(labels: np.ndarray, upsample: int | None, downsample: int | None, seed: int) -> np.ndarray:
    """Row positions after balancing.

    Args:
        labels: class of each row.
        upsample: classes with fewer rows are sampled with replacement up to this many (all originals kept).
        downsample: classes with more rows are sampled without replacement down to this many.
        seed: makes the result deterministic.

    Returns:
        Sorted positions (with repeats where upsampled).
    """
    if upsample is None and downsample is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    out = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if downsample is not None and len(idx) > downsample:
            idx = np.sort(rng.choice(idx, size=downsample, replace=False))
        if upsample is not None and len(idx) < upsample:
            extra = rng.choice(idx, size=upsample - len(idx), replace=True)
            idx = np.concatenate([idx, extra])
        out.append(idx)
    return np.sort(np.concatenate(out))
