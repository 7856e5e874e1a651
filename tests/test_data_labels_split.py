"""Label encoding, the stratified split and class balancing: order, determinism, counts."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from metric_ds.data.balance import balance_indices
from metric_ds.data.labels import LabelMap
from metric_ds.data.split import stratified_split


@pytest.mark.parametrize("labels,names", [
    ([10, 2, 33, 2, np.int64(10)], [2, 10, 33]),
    (["b", "B", "a", "a10", "a9"], ["B", "a", "a10", "a9", "b"]),
])
def test_label_map_order_encode_decode_save_load(tmp_path, labels, names):
    lm = LabelMap.from_labels(labels)
    assert lm.names == names and lm.num_classes == len(names) == len(lm)
    assert all(type(n) is type(names[0]) for n in lm.names)  # numpy scalars become Python's
    ids = lm.encode(labels)
    assert ids.dtype == np.int64 and lm.decode(ids) == [names[names.index(v)] for v in labels]
    lm.save(tmp_path / "labels.json")
    data = json.loads((tmp_path / "labels.json").read_text())
    assert data == {"type": "int" if isinstance(names[0], int) else "str", "names": names}
    assert LabelMap.load(tmp_path / "labels.json") == lm


def test_label_map_keeps_string_digits_apart_from_ints(tmp_path):
    lm = LabelMap.from_labels(["1", "10", "2"])
    assert lm.names == ["1", "10", "2"]  # lexicographic: they are strings
    lm.save(tmp_path / "labels.json")
    back = LabelMap.load(tmp_path / "labels.json")
    assert back.names == ["1", "10", "2"] and 1 not in back and "1" in back


def test_label_map_errors():
    with pytest.raises(KeyError, match="'zz'"):
        LabelMap.from_labels(["a", "b"]).encode(["a", "zz"])
    with pytest.raises(ValueError, match="mixed types"):
        LabelMap.from_labels([1, "a"])


def _labels(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


@pytest.mark.parametrize("val_ratio", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("seed", [0, 7])
def test_split_is_stratified_disjoint_and_deterministic(val_ratio, seed):
    counts = [40, 23, 17, 100, 9]
    labels = np.random.default_rng(seed).permutation(_labels(counts))
    tr, va = stratified_split(labels, val_ratio, seed)
    tr2, va2 = stratified_split(labels, val_ratio, seed)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(labels)))
    per_class_val = np.bincount(labels[va], minlength=len(counts))
    assert np.abs(per_class_val - np.array(counts) * val_ratio).max() <= 0.5 + 1e-9
    other = stratified_split(labels, val_ratio, seed + 1)[1]
    assert not np.array_equal(va, other)


def test_small_classes_stay_in_train_with_one_warning(caplog):
    labels = _labels([30, 1, 2, 4, 1])  # at 0.2: classes 1, 2 (round(0.4) = 0) and 4 stay; class 3 gives 1
    sink: list[str] = []
    with caplog.at_level(logging.WARNING, logger="metric_ds"):
        tr, va = stratified_split(labels, 0.2, seed=0, warnings_out=sink)
    assert np.bincount(labels[va], minlength=5).tolist() == [6, 0, 0, 1, 0]
    assert len(sink) == 1 and "3 class(es) too small to split by val_ratio=0.2 stay entirely in train" in sink[0]
    assert sink[0] in caplog.text


def test_split_always_leaves_a_train_row():
    labels = _labels([2, 3])
    tr, va = stratified_split(labels, 0.9, seed=0)
    assert np.bincount(labels[tr]).tolist() == [1, 1] and np.bincount(labels[va]).tolist() == [1, 2]


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5])
def test_split_ratio_outside_0_1(ratio):
    with pytest.raises(ValueError, match="val_ratio must be in"):
        stratified_split(_labels([5, 5]), ratio, 0)


@pytest.mark.parametrize("up,down,want", [
    (None, None, [10, 3, 6, 1]),
    (5, None, [10, 5, 6, 5]),
    (None, 4, [4, 3, 4, 1]),
    (5, 8, [8, 5, 6, 5]),
    (6, 6, [6, 6, 6, 6]),
])
@pytest.mark.parametrize("seed", [0, 3])
def test_balance_counts_and_determinism(up, down, want, seed):
    labels = np.random.default_rng(seed).permutation(_labels([10, 3, 6, 1]))
    idx = balance_indices(labels, upsample=up, downsample=down, seed=seed)
    assert np.bincount(labels[idx], minlength=4).tolist() == want
    assert np.array_equal(idx, balance_indices(labels, upsample=up, downsample=down, seed=seed))
    assert np.all(np.diff(idx) >= 0)
    for cls, n in enumerate([10, 3, 6, 1]):
        rows = idx[labels[idx] == cls]
        if up is not None and n < up:  # upsampling keeps every original row
            assert set(rows) == set(np.flatnonzero(labels == cls))
        if down is not None and n > down:  # downsampling is without replacement
            assert len(set(rows)) == len(rows) == down


def test_balance_differs_by_seed_and_rejects_bad_bounds():
    labels = _labels([50, 2])
    assert not np.array_equal(balance_indices(labels, 10, 20, 0), balance_indices(labels, 10, 20, 1))
    with pytest.raises(ValueError, match="upsample \\(9\\) must be <= downsample \\(3\\)"):
        balance_indices(labels, 9, 3, 0)
    with pytest.raises(ValueError, match="downsample must be a positive"):
        balance_indices(labels, None, 0, 0)
