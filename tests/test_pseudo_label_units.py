"""The pseudo-label package's units: each assigner behind the one interface, the registry of methods, the settings
model's errors (every bad flag at once, each named), and the output table and summary on a constructed case."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from metric_ds.commands.pseudo_label import Options
from metric_ds.errors import UserError
from metric_ds.pseudo_label import (
    ASSIGNERS,
    METHODS,
    Assigner,
    Assignment,
    KMeansAssigner,
    KnnAssigner,
    Settings,
    assign_by_clusters,
    assign_by_knn,
    build_summary,
    output_table,
    split_labelled,
)

# two tight groups: rows 0-4 near (1, 0), rows 5-9 near (0, 1); two labelled rows in each group
X = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5, dtype=np.float32) + np.linspace(0, 0.01, 10)[:, None]
Y = np.array([0, 0, -1, -1, -1, 1, 1, -1, -1, -1])


@pytest.mark.parametrize("method", METHODS)
def test_each_method_is_an_assigner(method):
    assigner: Assigner = ASSIGNERS[method](X, 2, Settings(method=method, k_multiple=1, neighbours=2))
    result = assigner.assign(Y)
    assert isinstance(result, Assignment)
    assert result.labels.tolist() == [-1, -1, 0, 0, 0, -1, -1, 1, 1, 1]
    np.testing.assert_allclose(result.confidence[Y < 0], 1.0)
    assert np.isnan(result.confidence[Y >= 0]).all()


def test_registry_covers_every_method():
    assert set(ASSIGNERS) == set(METHODS) == {"kmeans", "knn"}


def test_assigners_equal_the_functions_they_wrap():
    """The interface adds nothing: the same labels as the plain functions, for any label vector (the clusters are
    fitted once and reused, as the precision estimate needs)."""
    km = KMeansAssigner.fit(X, 2, Settings(k_multiple=1, min_purity=0.5, min_labelled=1))
    knn = KnnAssigner.fit(X, 2, Settings(neighbours=3, margin=0.2))
    for y in (Y, np.where(np.arange(10) == 0, -1, Y)):
        a, b = km.assign(y), assign_by_clusters(km.clusters, y, 2, 0.5, 1)
        assert a.labels.tolist() == b.labels.tolist() and a.groups == b.groups
        assert knn.assign(y).labels.tolist() == assign_by_knn(X, y, 2, 3, 0.2).labels.tolist()


def test_settings_errors_name_every_flag_at_once():
    with pytest.raises(UserError) as info:
        Settings(method="dbscan", k_multiple=0, min_purity=1.5, margin=-0.1, holdout_fraction=1.0,
                 labelled_share=0.0, min_labeled=3)
    assert info.value.messages == [
        "--method must be one of kmeans, knn, got 'dbscan'",
        "--k-multiple must be >= 1, got 0",
        "--min-purity must be in [0, 1], got 1.5",
        "--margin must be in [0, 1], got -0.1",
        "--holdout-fraction must be in [0, 1), got 1.0",
        "--labelled-share must be in (0, 1), got 0.0",
        ("min_labeled: unknown setting; known: method, k_multiple, min_purity, min_labelled, neighbours, margin, "
         "metric_mask, holdout_fraction, labelled_share, keep_unassigned, seed"),
    ]


def test_settings_are_frozen_and_recorded_in_field_order():
    s = Settings(seed=3)
    with pytest.raises(ValidationError):
        s.seed = 4  # type: ignore[misc]
    assert list(s.thresholds()) == list(Settings.model_fields) and s.thresholds()["seed"] == 3


def test_command_options_check_outputs_and_embedding_with_the_settings():
    with pytest.raises(UserError) as info:
        Options(input="in.csv", output="out.xlsx", summary="s.txt", batch_size=0, max_seq_length=1, neighbours=0)
    messages = info.value.messages
    assert len(messages) == 5
    assert "--neighbours must be >= 1, got 0" in messages and "--batch-size must be >= 1, got 0" in messages
    assert "--max-seq-length must be > 1, got 1" in messages and "--summary s.txt: give a .json file" in messages
    assert any(m.startswith("--output out.xlsx: unknown table extension '.xlsx'") for m in messages)
    assert Options(input="i.csv", output="o.parquet", margin=0.5).settings() == Settings(margin=0.5)


def test_output_table_and_summary_counts():
    result = ASSIGNERS["kmeans"](X, 2, Settings(k_multiple=1)).assign(Y)
    texts = pd.DataFrame({"text": [f"t{i}" for i in range(10)], "label": ["a", "a", None, None, None,
                                                                         "b", "b", None, None, None]})
    table, counts = output_table(texts, Y, result, ["a", "b"], Settings(labelled_share=0.5))
    assert counts == {"written": 14, "pseudo_written": 6, "unassigned_written": 0, "labelled_repeat": 2,
                      "left_out_by_metric_mask": 0}
    assert table["text"].tolist()[:4] == ["t0", "t1", "t5", "t6"] and table["text"].tolist()[8:] == [
        "t2", "t3", "t4", "t7", "t8", "t9"]
    summary = build_summary(Y, result, ["a", "b"], Settings(), {"held_out": 0}, counts)
    assert summary["pseudo_labelled"] == 6 and summary["coverage"] == 1.0
    assert summary["per_class"] == {"a": {"labelled": 2, "pseudo": 3}, "b": {"labelled": 2, "pseudo": 3}}
    assert summary["clusters"]["k"] == 2 and summary["clusters"]["passing"] == 2
    only, counts = output_table(texts, Y, result, ["a", "b"], Settings(metric_mask="labelled"))
    assert len(only) == 4 and counts["left_out_by_metric_mask"] == 6


def test_a_run_folder_embeds_with_its_best_model(tiny_run):
    """`pseudo-label --model RUN_DIR` takes the run's best/, as load, evaluate, predict and export do."""
    from metric_ds.pseudo_label import load_embedder

    assert load_embedder(tiny_run).kind == "export"
    assert load_embedder(tiny_run / "best").kind == "export"


def _rows_with_ids() -> pd.DataFrame:
    """Y's rows as an input table with the user's own columns of several dtypes beside text and label."""
    return pd.DataFrame({
        "row_id": np.arange(100, 110, dtype=np.int64),
        "text": [f"t{i}" for i in range(10)],
        "label": ["a" if v == 0 else "b" if v == 1 else None for v in Y],
        "group": pd.Categorical(["g1", "g2"] * 5),
        "note": ["n0", None, "n2", None, "n4", None, "n6", None, "n8", None],
        "flag": [True, False] * 5,
        "weight": np.linspace(0, 1, 10, dtype=np.float32),
    })


@pytest.mark.parametrize("settings", [Settings(k_multiple=1), Settings(k_multiple=1, labelled_share=0.5),
                                      Settings(k_multiple=1, metric_mask="labelled")])
def test_output_table_keeps_every_input_column(settings):
    """Every input column comes through unchanged (values and dtypes), so a pseudo-label traces back to its row by
    the user's id; --labelled-share repeats a labelled row's columns with it."""
    df = _rows_with_ids()
    y, classes = split_labelled(df, "in.csv", settings)
    result = ASSIGNERS["kmeans"](X, 2, settings).assign(y)
    table, counts = output_table(df, y, result, classes, settings)
    assert list(table.columns) == [*df.columns, "metric_mask", "classifier_mask", "source", "confidence"]
    own = [c for c in df.columns if c != "label"]
    assert all(table[c].dtype == df[c].dtype for c in own)
    source = df.set_index("row_id").loc[table["row_id"]].reset_index()
    pd.testing.assert_frame_equal(table[own], source[own])
    repeat = counts["labelled_repeat"]
    assert table["row_id"].value_counts().to_dict() == {
        **{100 + i: repeat for i in np.flatnonzero(Y >= 0)},
        **({100 + i: 1 for i in np.flatnonzero(Y < 0)} if settings.metric_mask == "all" else {})}
    pseudo = table[table["source"] == "pseudo"]
    assert pseudo["label"].tolist() == ["a" if i < 5 else "b" for i in pseudo["row_id"] - 100]


@pytest.mark.parametrize("column", ["source", "confidence"])
def test_an_input_column_named_like_an_output_is_refused(tmp_path, capsys, column):
    """The user's column is never overwritten: an input with a column that pseudo-label writes is refused, with
    its name, before any model is loaded (as predict refuses one)."""
    from metric_ds.cli import main

    df = _rows_with_ids().assign(**{column: 1})
    with pytest.raises(UserError, match=rf"in.csv: already has column\(s\) {column}, which pseudo-label writes; "
                                        "rename or drop them"):
        split_labelled(df, "in.csv", Settings())
    src, out = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    df.to_json(src, orient="records", lines=True)
    assert main(["pseudo-label", "--input", str(src), "--output", str(out), "--model", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert f"already has column(s) {column}" in err and "Traceback" not in err and not out.exists()


def test_the_input_masks_are_replaced():
    """A table from `metric-ds prepare` has masks: pseudo-label decides them anew, after the input's columns."""
    df = _rows_with_ids().assign(metric_mask=0, classifier_mask=0)
    y = np.array([0 if lab == "a" else 1 if lab == "b" else -1 for lab in df["label"]])
    result = Assignment(np.where(y < 0, 0, -1), np.where(y < 0, 0.9, 0.0))
    table, _ = output_table(df, y, result, ["a", "b"], Settings())
    assert list(table.columns[-4:]) == ["metric_mask", "classifier_mask", "source", "confidence"]
    assert (table.loc[table["source"] == "labelled", "classifier_mask"] == 1).all()
    assert (table["metric_mask"] == 1).all()
