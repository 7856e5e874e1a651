"""Stratified train/validation split."""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("metric_ds")


def stratified_split(labels: np.ndarray, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row positions per class: ``round(n_c * val_ratio)`` rows of class c go to validation.

    A class whose validation share rounds to 0, or that would leave nothing in train, stays entirely in train
    (with one warning giving the number of such classes).

    Returns:
        ``(train_idx, val_idx)``, each sorted.
    """
    rng = np.random.default_rng(seed)
    train, val, kept = [], [], 0
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n_val = int(round(len(idx) * val_ratio))
        if n_val == 0 or n_val >= len(idx):
            kept += 1
            train.append(idx)
            continue
        idx = rng.permutation(idx)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    if kept:
        log.warning("%d class(es) too small to split by val_ratio=%s stay entirely in train", kept, val_ratio)
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    return cat(train), cat(val)
