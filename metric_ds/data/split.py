"""Stratified train/validation split."""
from __future__ import annotations

import numpy as np

from metric_ds.data.notices import warn


def stratified_split(labels: np.ndarray, val_ratio: float, seed: int, warnings_out: list[str] | None = None,
                     unit: str = "class(es)") -> tuple[np.ndarray, np.ndarray]:
    """Split row positions per class: ``round(n_c * val_ratio)`` rows of class c go to validation.

    Rounding is Python's (halves to even: 2.5 -> 2), and at least one row of a class stays in train. A class
    whose validation share rounds to 0 (including every class of one row) stays entirely in train, with one
    warning giving the number of such classes. Deterministic given ``seed``.

    Args:
        labels: class of each row, shape (N,).
        val_ratio: share of each class for validation, in (0, 1).
        seed: the random seed.
        warnings_out: if given, the warning is also appended to it.
        unit: what a stratum is, for the warning (e.g. ``"(label, masks) group(s)"``).

    Returns:
        ``(train_idx, val_idx)``: disjoint, sorted positions covering 0..N-1.
    """
    if not 0 < val_ratio < 1:
        raise ValueError(f"val_ratio must be in (0, 1), got {val_ratio}")
    labels = np.asarray(labels)
    # A stream of its own: `metric-ds prepare --seed S` draws its labelled subset from default_rng(S) over the
    # same per-class index arrays, and sharing that stream would send exactly the labelled rows to validation.
    rng = np.random.default_rng([seed, 0x5B117])
    train, val, kept = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)], 0
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n_val = min(round(len(idx) * val_ratio), len(idx) - 1)
        if n_val <= 0:
            kept += 1
            train.append(idx)
            continue
        idx = rng.permutation(idx)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    if kept:
        warn(f"{kept} {unit} too small to split by val_ratio={val_ratio} stay entirely in train "
             "(they are not validated)", warnings_out)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def labelled_rows_for_validation(labels: np.ndarray, val_ratio: float, seed: int) -> np.ndarray:
    """Positions (into ``labels``) of labelled rows to move to validation when the stratified split left none
    there: ``max(1, round(n * val_ratio))`` rows, at most one per class, from classes that keep at least one
    labelled row in train (an empty result: no class has two labelled rows).

    Args:
        labels: the classes of the labelled training rows.
        val_ratio, seed: as for :func:`stratified_split` (its own RNG stream).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0x7A1])
    classes, counts = np.unique(labels, return_counts=True)
    eligible = rng.permutation(classes[counts >= 2])
    take = min(max(1, round(len(labels) * val_ratio)), len(eligible))
    return np.sort(np.array([rng.choice(np.flatnonzero(labels == c)) for c in eligible[:take]], dtype=np.int64))
