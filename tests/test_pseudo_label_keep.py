"""``metric-ds pseudo-label --keep-unassigned``: the rows it could not label are kept as label-free rows (label null,
metric_mask 1, classifier_mask 0), which train SupCon with a second view of themselves; off by default."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_frame

from metric_ds.cli import main
from metric_ds.data.labels import LABEL_FREE
from metric_ds.data.pipeline import build_training_data
from metric_ds.errors import UserError
from metric_ds.pseudo_label import Settings
from metric_ds.pseudo_label.assign import Assignment
from metric_ds.pseudo_label.summary import format_summary
from metric_ds.pseudo_label.table import output_table


def _case(classes: list):
    df = pd.DataFrame({"text": [f"t{i}" for i in range(8)], "id": range(8)})
    y = np.array([0, 1, -1, -1, 0, -1, 1, -1])
    result = Assignment(np.array([-1, -1, 1, -1, -1, 0, -1, -1]),
                        np.array([np.nan, np.nan, 0.9, np.nan, np.nan, 0.8, np.nan, np.nan]))
    df["label"] = [classes[v] if v >= 0 else None for v in y]
    return df, y, result


@pytest.mark.parametrize("classes", [["a", "b"], [10, 20]])
def test_unassigned_rows_are_kept_as_label_free_rows(classes):
    df, y, result = _case(classes)
    table, counts = output_table(df, y, result, classes, Settings(keep_unassigned=True))
    free = table[table["source"] == "unassigned"]
    assert free["id"].tolist() == [3, 7] and free["label"].isna().all() and free["confidence"].isna().all()
    assert (free["metric_mask"] == 1).all() and (free["classifier_mask"] == 0).all()
    assert counts["unassigned_written"] == 2 and counts["written"] == 8 and counts["pseudo_written"] == 2
    assert table.loc[table["source"] != "unassigned", "label"].tolist() == [classes[i] for i in (0, 1, 0, 1, 1, 0)]
    data = build_training_data(table, val_ratio=0.5, batch_size=2)  # a training table as it is
    assert (data.train["label_id"] == LABEL_FREE).sum() == 2


def test_off_by_default_the_unassigned_rows_are_left_out():
    df, y, result = _case(["a", "b"])
    table, counts = output_table(df, y, result, ["a", "b"], Settings())
    assert len(table) == 6 and counts["unassigned_written"] == 0 and not table["label"].isna().any()
    assert "label-free" not in format_summary({"rows": 8, "labelled": 4, "unlabelled": 4, "pseudo_labelled": 2,
                                               "coverage": 0.5, "rejected": 2, "estimated_precision": {
                                                   "precision": None, "held_out": 0, "assigned": 0, "coverage": None},
                                               **counts})


def test_keep_unassigned_with_supcon_on_labelled_rows_only_is_refused():
    with pytest.raises(UserError) as info:
        Settings(metric_mask="labelled", keep_unassigned=True)
    assert info.value.messages == [("--keep-unassigned keeps rows for SupCon, which --metric-mask labelled restricts "
                                    "to labelled rows; use --metric-mask all, or leave --keep-unassigned out")]


def test_the_command_keeps_them_and_says_so(tmp_path, capsys, tiny_model_dir):
    df = make_frame(60, num_classes=3).drop(columns=["metric_mask", "classifier_mask"])
    df.loc[df.index % 3 != 0, "label"] = None
    src, out, summary_path = tmp_path / "in.csv", tmp_path / "out.csv", tmp_path / "s.json"
    df.to_csv(src, index=False)
    assert main(["pseudo-label", "--input", str(src), "--output", str(out), "--model", str(tiny_model_dir),
                 "--min-purity", "1", "--min-labelled", "3", "--keep-unassigned", "--summary", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["thresholds"]["keep_unassigned"] is True and summary["unassigned_written"] == summary["rejected"] > 0
    assert f"{summary['rejected']} rejected rows kept as label-free rows" in capsys.readouterr().out
    table = pd.read_csv(out)
    assert len(table) == 60 and table["label"].isna().sum() == summary["rejected"]
    data = build_training_data(out, val_ratio=0.2, batch_size=4)
    assert (data.train["label_id"] == LABEL_FREE).sum() == summary["rejected"]
