"""metric-ds pseudo-label: purity and majority assignment, the thresholds, the k-NN vote, the held-out precision
estimate against known answers, refusals that write nothing, and one end-to-end run with a tiny model."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_frame

from metric_ds.cli import main
from metric_ds.data.pipeline import build_training_data
from metric_ds.pseudo_label import (
    Settings,
    assign_by_clusters,
    assign_by_knn,
    cluster_embeddings,
    cluster_purity,
    embed_texts,
    estimate_precision,
    holdout_rows,
    load_embedder,
    pseudo_label_frame,
    repeat_labelled,
    split_labelled,
)

# clusters 0..2; y = -1 marks an unlabelled row
CLUSTERS = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
LABELS = np.array([0, 0, 0, 1, -1, 1, 1, -1, -1, 2, -1])


def test_purity_support_and_majority():
    support, purity, majority = cluster_purity(CLUSTERS, LABELS, num_classes=3)
    assert support.tolist() == [4, 2, 1]
    np.testing.assert_allclose(purity, [0.75, 1.0, 1.0])
    assert majority.tolist() == [0, 1, 2]


def test_purity_of_a_cluster_without_labelled_rows_and_ties():
    support, purity, majority = cluster_purity(np.array([0, 0, 1, 1]), np.array([-1, -1, 1, 0]), num_classes=2)
    assert support.tolist() == [0, 2] and purity.tolist() == [0.0, 0.5]
    assert majority.tolist() == [-1, 0]  # no labelled row: no majority; a tie goes to the smaller id


@pytest.mark.parametrize("min_purity,min_labelled,want", [
    (0.7, 1, [0, 1, 1, 2]),     # every cluster passes
    (0.8, 1, [-1, 1, 1, 2]),    # cluster 0 (purity 0.75) fails
    (0.7, 2, [0, 1, 1, -1]),    # cluster 2 (one labelled row) fails
    (0.8, 3, [-1, -1, -1, -1]),
    (1.0, 2, [-1, 1, 1, -1]),   # purity 1.0 passes a threshold of 1.0
])
def test_cluster_thresholds(min_purity, min_labelled, want):
    a = assign_by_clusters(CLUSTERS, LABELS, 3, min_purity, min_labelled)
    unl = LABELS < 0
    assert a.labels[unl].tolist() == want
    assert (a.labels[~unl] == -1).all(), "labelled rows are never pseudo-labelled"
    conf = a.confidence[unl]
    assert np.isnan(conf[np.array(want) < 0]).all()
    np.testing.assert_allclose(conf[np.array(want) >= 0], [{0: 0.75, 1: 1.0, 2: 1.0}[w] for w in want if w >= 0])


def _knn_case() -> tuple[np.ndarray, np.ndarray]:
    """One unlabelled row at (1, 0); five labelled rows near it: three of class 0 (the closest) and two of
    class 1; far away, three rows of class 2."""
    angles = np.array([0.0, 0.05, -0.05, 0.1, -0.1, 0.3, 3.0, 3.05, 3.1])
    x = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    y = np.array([-1, 0, 0, 1, 1, 0, 2, 2, 2])
    return x, y


@pytest.mark.parametrize("neighbours,margin,want_label,want_conf", [
    (4, 0.0, 0, 0.5),     # 2 vs 2: a tie passes margin 0 and goes to the smaller id
    (4, 0.1, -1, None),   # ... and never passes a positive margin
    (5, 0.2, 0, 0.6),     # 3 vs 2: lead 0.2
    (5, 0.25, -1, None),
    (2, 1.0, 0, 1.0),     # the two closest are both class 0
])
def test_knn_vote_and_margin(neighbours, margin, want_label, want_conf):
    x, y = _knn_case()
    a = assign_by_knn(x, y, num_classes=3, neighbours=neighbours, margin=margin)
    assert a.labels[0] == want_label and (a.labels[1:] == -1).all()
    if want_conf is None:
        assert np.isnan(a.confidence[0])
    else:
        assert a.confidence[0] == pytest.approx(want_conf)


def test_holdout_is_stratified_and_keeps_a_row_of_each_class():
    y = np.array([0] * 10 + [1] * 5 + [2] * 1 + [-1] * 4)
    rows = holdout_rows(y, 0.5, seed=3)
    assert np.bincount(y[rows], minlength=3).tolist() == [5, 2, 0]  # 2.5 rounds to even; class 2 keeps its row
    assert (y[rows] >= 0).all()
    assert holdout_rows(y, 0.5, seed=3).tolist() == rows.tolist()


def test_precision_estimate_known_answer():
    """Cluster 0: eight rows of class 0, two of class 1; half of each class is hidden, so cluster 0 keeps four
    of class 0 and one of class 1 (purity 0.8, passes) and gives class 0 to its five hidden rows: 4 right, 1
    wrong. Cluster 1: four of class 2, two hidden, both right. Cluster 2: two of class 3, one hidden; one
    labelled row is left, below min_labelled, so it is not assigned. 6 of 7 assigned are right; 7 of 8 assigned."""
    clusters = np.array([0] * 10 + [1] * 4 + [2] * 2 + [0, 1])
    y = np.array([0] * 8 + [1] * 2 + [2] * 4 + [3] * 2 + [-1, -1])
    for seed in range(5):  # whichever rows are hidden
        est = estimate_precision(lambda labels: assign_by_clusters(clusters, labels, 4, 0.8, 2), y, 0.5, seed)
        assert est == {"held_out": 8, "assigned": 7, "coverage": 7 / 8, "precision": pytest.approx(6 / 7)}


def test_cluster_embeddings_finds_separated_groups():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16, dtype=np.float32)
    truth = np.repeat(np.arange(4), 25)
    x = centres[truth] + 0.01 * rng.normal(size=(100, 16)).astype(np.float32)
    got = cluster_embeddings(x, 4, seed=0)
    assert all(len(set(got[truth == c])) == 1 for c in range(4)) and len(set(got)) == 4


def _frame(n_labelled: int = 4, n_unlabelled: int = 6) -> pd.DataFrame:
    texts = [f"text {i}" for i in range(2 * (n_labelled + n_unlabelled))]
    labels = (["a"] * n_labelled + [None] * n_unlabelled) + (["b"] * n_labelled + [""] * n_unlabelled)
    return pd.DataFrame({"text": texts, "label": labels})


def test_frame_output_masks_and_summary():
    df = _frame()
    y, classes = split_labelled(df, "t", Settings())
    assert classes == ["a", "b"] and (y >= 0).sum() == 8
    # two tight groups along the labels: every unlabelled row lands in its class's cluster
    x = np.where((np.arange(len(df)) < 10)[:, None], [1.0, 0.0], [0.0, 1.0]).astype(np.float32)
    table, summary = pseudo_label_frame(df, x, y, classes, Settings(k_multiple=1, holdout_fraction=0.25))
    assert list(table.columns) == ["text", "label", "metric_mask", "classifier_mask", "source", "confidence"]
    lab, pseudo = table[table["source"] == "labelled"], table[table["source"] == "pseudo"]
    assert len(lab) == 8 and (lab["classifier_mask"] == 1).all() and (lab["metric_mask"] == 1).all()
    assert len(pseudo) == 12 and (pseudo["classifier_mask"] == 0).all() and (pseudo["metric_mask"] == 1).all()
    assert pseudo["label"].tolist() == ["a"] * 6 + ["b"] * 6
    assert summary["coverage"] == 1.0 and summary["rejected"] == 0
    assert summary["per_class"] == {"a": {"labelled": 4, "pseudo": 6}, "b": {"labelled": 4, "pseudo": 6}}
    assert summary["estimated_precision"] == {"held_out": 2, "assigned": 2, "coverage": 1.0, "precision": 1.0}
    assert summary["clusters"]["purity_histogram"]["0.9-1.0"] == 2
    only_labelled, s2 = pseudo_label_frame(df, x, y, classes, Settings(k_multiple=1, metric_mask="labelled"))
    assert len(only_labelled) == 8 and s2["left_out_by_metric_mask"] == 12


@pytest.mark.parametrize("n_labelled,n_rest,share,want_r", [
    (693, 8000, 0.5, 12),  # 693 x 12 = 8316 labelled of 16316 rows
    (10, 30, 0.25, 1),
    (10, 90, 0.5, 9),
    (10, 2, 0.5, 1),       # never fewer than one copy
])
def test_repeat_labelled(n_labelled, n_rest, share, want_r):
    table = pd.DataFrame({"text": [f"t{i}" for i in range(n_labelled + n_rest)],
                          "classifier_mask": [1] * n_labelled + [0] * n_rest})
    out, r = repeat_labelled(table, share)
    assert r == want_r and len(out) == want_r * n_labelled + n_rest
    assert out["text"].value_counts()["t0"] == want_r and out["text"].value_counts().get(f"t{n_labelled}") == (
        1 if n_rest else None)


def test_labelled_share_in_the_output():
    df = _frame()
    y, classes = split_labelled(df, "t", Settings())
    x = np.where((np.arange(len(df)) < 10)[:, None], [1.0, 0.0], [0.0, 1.0]).astype(np.float32)
    table, summary = pseudo_label_frame(df, x, y, classes, Settings(k_multiple=1, labelled_share=0.5))
    assert summary["labelled_repeat"] == 2 and (table["source"] == "labelled").sum() == 16 and len(table) == 28


@pytest.mark.parametrize("frame,args,message", [
    (pd.DataFrame({"text": ["a", "b"], "intent": ["x", None]}), [], "missing column(s) label"),
    (_frame(n_unlabelled=0), [], "no unlabelled row"),
    (_frame().assign(label=None), [], "no labelled row"),
    (_frame().assign(text=[" "] + [f"t{i}" for i in range(19)]), [], "column text: null, empty or non-text values in row 1"),
    (_frame(n_labelled=1), [], "class(es) with fewer than --min-labelled = 2 labelled row(s): a, b"),
    (_frame().assign(label=[1, 2, 3, "x"] + [None] * 16), [], "labels of mixed types"),
    (_frame(), ["--min-purity", "1.5"], "--min-purity must be in [0, 1], got 1.5"),
    (_frame(), ["--holdout-fraction", "1"], "--holdout-fraction must be in [0, 1), got 1.0"),
    (_frame(), ["--summary", "s.txt"], "give a .json file"),
    (_frame(), ["--labelled-share", "1"], "--labelled-share must be in (0, 1), got 1.0"),
])
def test_bad_input_is_refused_and_nothing_written(tmp_path, capsys, frame, args, message):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    frame.to_json(src, orient="records", lines=True)
    assert main(["pseudo-label", "--input", str(src), "--output", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "s.txt").exists()


def test_bad_output_extension_is_refused(tmp_path, capsys):
    src = tmp_path / "in.parquet"
    _frame().to_parquet(src)
    assert main(["pseudo-label", "--input", str(src), "--output", str(tmp_path / "out.xlsx")]) == 1
    assert "--output" in capsys.readouterr().err and not (tmp_path / "out.xlsx").exists()


@pytest.mark.parametrize("method", ["kmeans", "knn"])
def test_end_to_end_with_a_tiny_model(tmp_path, capsys, tiny_model_dir, method):
    df = make_frame(60, num_classes=3).drop(columns=["metric_mask", "classifier_mask"])
    df.loc[df.index % 3 != 0, "label"] = None
    src, out, summary_path = tmp_path / "in.csv", tmp_path / "out.parquet", tmp_path / "summary.json"
    df.to_csv(src, index=False)
    assert main(["pseudo-label", "--input", str(src), "--output", str(out), "--model", str(tiny_model_dir),
                 "--method", method, "--min-purity", "0", "--min-labelled", "1", "--margin", "0",
                 "--summary", str(summary_path)]) == 0
    printed = capsys.readouterr().out
    assert "estimated precision" in printed and f"wrote {out}" in printed
    table, summary = pd.read_parquet(out), json.loads(summary_path.read_text())
    assert summary["labelled"] == 20 and summary["unlabelled"] == 40
    assert summary["pseudo_labelled"] + summary["rejected"] == 40 and len(table) == 20 + summary["pseudo_labelled"]
    assert summary["thresholds"]["method"] == method
    assert "caveat" not in summary["estimated_precision"]  # a plain encoder never saw the labels
    # thresholds of 0: every unlabelled row is given a label
    assert summary["pseudo_labelled"] == 40 and summary["coverage"] == 1.0
    # the table is a training table as it is, extra columns and all
    data = build_training_data(out, val_ratio=0.2, batch_size=4)
    assert len(data.train) + len(data.val) == 60 and data.label_map.num_classes == 3


def test_a_trained_model_flags_the_estimate_as_optimistic(tmp_path, capsys, tiny_run):
    """Round 2 (``--model RUN/best``): the model trained on the held-out labelled rows, so the summary says the
    estimate leans high; round 1 (a plain encoder) carries no such caveat (the end-to-end test above)."""
    df = make_frame(48, num_classes=3).drop(columns=["metric_mask", "classifier_mask"])
    df.loc[df.index % 3 != 0, "label"] = None
    src, out, summary_path = tmp_path / "in.csv", tmp_path / "out.parquet", tmp_path / "summary.json"
    df.to_csv(src, index=False)
    assert main(["pseudo-label", "--input", str(src), "--output", str(out), "--model", str(tiny_run / "best"),
                 "--min-purity", "0", "--min-labelled", "1", "--summary", str(summary_path)]) == 0
    assert "optimistic" in capsys.readouterr().out
    assert "optimistic" in json.loads(summary_path.read_text())["estimated_precision"]["caveat"]


@pytest.mark.parametrize("which", ["encoder", "export"])
def test_batched_embeddings_keep_input_order(tiny_model_dir, tiny_run, which):
    """Length-sorted batches give each text the embedding it gets alone (padding changes nothing), in input
    order, with unit norm: for a plain encoder (mean pooling) and a trained export (its ``z``)."""
    texts = ["card", "my top up failed twice yesterday at the atm", "pin", "exchange fee for a transfer abroad",
             "lost card", "refund"]
    embedder = load_embedder(tiny_model_dir if which == "encoder" else tiny_run / "best")
    batched = embed_texts(embedder, texts, batch_size=4, max_seq_length=128, device="cpu")
    alone = np.concatenate([embed_texts(embedder, [t], batch_size=1, max_seq_length=128, device="cpu") for t in texts])
    assert batched.shape == (len(texts), alone.shape[1]) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])  # distinct texts, distinct rows: the order is checked
