"""metric-ds evaluate: a missing bank table is a clear error; the defaults are the config schema's."""
from __future__ import annotations

import pytest

from metric_ds.errors import UserError


def test_evaluate_with_a_missing_bank_file_is_an_error(tmp_path, tiny_run, tiny_table):
    from metric_ds.commands.evaluate import evaluate

    with pytest.raises(UserError, match="--bank-data: .*nowhere.parquet does not exist"):
        evaluate(tiny_run / "best", tiny_table, bank_data=tmp_path / "nowhere.parquet")


def test_evaluate_defaults_are_metric_validations(tiny_run):
    """Called from Python without retrieval settings, evaluate() uses the config schema's, as training does."""
    from metric_ds.commands.evaluate import evaluate
    from metric_ds.config import schema_default

    table = tiny_run.parent.parent / "train.parquet"
    results = evaluate(tiny_run, table, device="cpu")  # the run folder resolves to its best/
    ks = schema_default("metric_validation.recall_at_k")
    assert sorted(results["retrieval"]) == sorted([f"recall@{k}" for k in ks] + ["knn_acc", "knn_f1"])
