"""metric-ds evaluate's inputs: a missing bank table is a clear error."""
from __future__ import annotations

import pytest

from metric_ds.errors import UserError


def test_evaluate_with_a_missing_bank_file_is_an_error(tmp_path, tiny_run, tiny_table):
    from metric_ds.commands.evaluate import evaluate

    with pytest.raises(UserError, match="--bank-data: .*nowhere.parquet does not exist"):
        evaluate(tiny_run / "best", tiny_table, bank_data=tmp_path / "nowhere.parquet")
