"""``contrastive_batch: accumulated`` across ranks: two processes with 2 micro-batches of 4 rows each take the step
of one process with 2 micro-batches of 8 rows: the contrast set is every rank's window, gathered."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import launch, make_cfg, make_frame, make_label_free_frame, records, write_cfg

pytestmark = pytest.mark.slow


def _config(root: Path, model_dir: Path, table: Path, batch_size: int) -> Path:
    return write_cfg(root / "cfg.yaml", make_cfg(
        root, model_dir, table, run_name="acc", model__classifier_dropout=0.0, training__batch_size=batch_size,
        training__gradient_accumulation_steps=2, training__contrastive_batch="accumulated", training__num_epochs=1,
        training__max_steps=3, training__supcon_impl="auto", optimizer__learning_rate=5e-5,
        scheduler__name="constant", checkpointing__save_every_n_batches=3))


def _weights(root: Path) -> dict[str, torch.Tensor]:
    ckpt = root / "runs" / "acc" / "checkpoints" / "step-3" / "ds"
    return torch.load(next(ckpt.rglob("*model_states.pt")), map_location="cpu", weights_only=False)["module"]


@pytest.mark.parametrize("label_free", [False, True])
def test_two_ranks_accumulated_equal_one(tmp_path, no_dropout_model_dir, label_free):
    """With label-free rows, every rank's rows and views are in the window's contrast set (no dropout: a view
    equals its row up to rounding)."""
    table = tmp_path / "t.parquet"
    df = make_label_free_frame(96) if label_free else make_frame(96)
    df.loc[df.index % 3 == 0, "classifier_mask"] = 0
    df.to_parquet(table)
    one, two = tmp_path / "w1", tmp_path / "w2"
    one.mkdir(), two.mkdir()
    launch(_config(one, no_dropout_model_dir, table, 8), 1)
    launch(_config(two, no_dropout_model_dir, table, 4), 2)
    recs = records(two / "runs" / "acc")
    first = [r for r in recs if "train/contrastive_batch" in r][0]
    assert first["train/metric_rows"] == 16 and (first["train/contrastive_batch"] > 16) == label_free
    expected = _weights(one)
    for name, tensor in _weights(two).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
