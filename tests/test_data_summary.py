"""The validate summary: counts, and the expected share of SupCon anchors with a positive, against simulation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_frame

from metric_ds.config import validate_config
from metric_ds.data.labels import LabelMap
from metric_ds.data.pipeline import load_training_data
from metric_ds.data.sampler import PKBatchSampler, RandomBatchSampler
from metric_ds.data.summary import (
    expected_anchor_pos_fraction,
    format_summary,
    pk_anchor_pos_fraction,
    summarize,
    summarize_frame,
)


def _anchor_share(batches, labels, metric) -> tuple[int, int]:
    hits = total = 0
    for b in batches:
        b = np.asarray(b)
        m = b[metric[b] == 1]
        counts = np.bincount(labels[m], minlength=labels.max() + 1)
        hits += int((counts[labels[m]] > 1).sum())
        total += len(m)
    return hits, total


@pytest.mark.parametrize("num_classes,batch_size,metric_share", [(12, 12, 0.7), (40, 8, 1.0), (5, 24, 0.3)])
def test_random_sampler_matches_the_hypergeometric_figure(num_classes, batch_size, metric_share):
    rng = np.random.default_rng(num_classes)
    n = 480  # a multiple of every batch size: every batch is a uniformly random subset of that size
    labels = rng.choice(num_classes, n, p=np.arange(1, num_classes + 1) / np.arange(1, num_classes + 1).sum())
    metric = (rng.random(n) < metric_share).astype(np.int8)
    want = expected_anchor_pos_fraction(labels, metric, n, batch_size)
    sampler = RandomBatchSampler(n, batch_size, seed=0)
    hits = total = 0
    for epoch in range(150):
        sampler.set_epoch(epoch)
        h, t = _anchor_share(sampler, labels, metric)
        hits, total = hits + h, total + t
    assert 0 < want < 1 and want == pytest.approx(hits / total, abs=0.01)


def test_pk_figure_matches_the_sampler():
    rng = np.random.default_rng(1)
    labels = np.concatenate([rng.integers(0, 10, 200), np.arange(10, 16)])  # six classes of one row
    metric = np.ones(len(labels), dtype=np.int8)
    metric[:40] = 0
    want = pk_anchor_pos_fraction(labels, metric)
    hits, total = _anchor_share(PKBatchSampler(labels, metric, 4, 3, 16, seed=0), labels, metric)
    assert want == pytest.approx(hits / total) and want < 1


def test_summarize_frame_counts():
    train = pd.DataFrame({"label_id": [0, 0, 0, 1, 2, 2], "metric_mask": [1, 1, 0, 1, 0, 1],
                          "classifier_mask": [1, 0, 1, 1, 1, 1]})
    s = summarize_frame(train, LabelMap(["a", "b", "c"]), batch_size=4, sampler="random", val_rows=3,
                        warnings=["w1"])
    assert {k: s[k] for k in ("train_rows", "val_rows", "classes", "metric_rows", "classifier_rows", "both_masks_rows",
                              "rows_per_class_min", "rows_per_class_median", "rows_per_class_max")} == {
        "train_rows": 6, "val_rows": 3, "classes": 3, "metric_rows": 4, "classifier_rows": 5, "both_masks_rows": 3,
        "rows_per_class_min": 1, "rows_per_class_median": 2.0, "rows_per_class_max": 3}
    text = format_summary(s)
    assert "6 train, 3 validation; 3 classes" in text and "metric 4, classifier 5, both 3" in text
    assert "min 1, median 2, max 3" in text and "warning: w1" in text
    assert f"{100 * s['expected_anchor_pos_frac']:.1f}% expected" in text


def test_summarize_for_a_config():
    cfg = validate_config({"data": {"train_path": "x.parquet", "sampler": "pk", "classes_per_batch": 2,
                                    "samples_per_class": 2}, "training": {"batch_size": 8}})
    data = load_training_data(cfg, frame=make_frame(60))
    s = summarize(data, cfg)
    assert s["sampler"] == "pk" and s["expected_anchor_pos_frac"] == 1.0
    assert s["train_rows"] == len(data.train) and s["val_rows"] == len(data.val)


def test_expected_anchor_fraction_matches_simulation():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 400)
    metric = (rng.random(400) < 0.7).astype(int)
    want = expected_anchor_pos_fraction(labels, metric, 400, 16)
    hits = total = 0
    for _ in range(3000):
        b = rng.choice(400, 16, replace=False)
        m = b[metric[b] == 1]
        counts = np.bincount(labels[m], minlength=12)
        hits += (counts[labels[m]] > 1).sum()
        total += len(m)
    assert want == pytest.approx(hits / total, abs=0.01)
