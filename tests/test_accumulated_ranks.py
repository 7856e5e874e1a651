"""``contrastive_batch: accumulated`` across ranks: two processes with 2 micro-batches of 4 rows each take the step
of one process with 2 micro-batches of 8 rows: the contrast set is every rank's window, gathered."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_frame

from metric_ds.distributed import free_port
from test_launch import _env

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _config(root: Path, model_dir: Path, table: Path, batch_size: int) -> Path:
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "run_name": "acc", "model_name": str(model_dir), "data": {"train_path": str(table), "val_ratio": 0.25},
        "model": {"classifier_dropout": 0.0},
        "training": {"batch_size": batch_size, "gradient_accumulation_steps": 2, "contrastive_batch": "accumulated",
                     "num_epochs": 1, "max_steps": 3, "max_seq_length": 16, "log_every_n_steps": 1, "seed": 3},
        "scheduler": {"name": "constant"},
        "checkpointing": {"checkpoints_dir": str(root / "runs"), "save_every_n_batches": 3, "save_best_by": "loss"},
    }))
    return path


def _weights(root: Path) -> dict[str, torch.Tensor]:
    ckpt = root / "runs" / "acc" / "checkpoints" / "step-3" / "ds"
    return torch.load(next(ckpt.rglob("*model_states.pt")), map_location="cpu", weights_only=False)["module"]


def test_two_ranks_accumulated_equal_one(tmp_path, no_dropout_model_dir):
    table = tmp_path / "t.parquet"
    df = make_frame(96)
    df.loc[df.index % 3 == 0, "classifier_mask"] = 0
    df.to_parquet(table)
    one, two = tmp_path / "w1", tmp_path / "w2"
    one.mkdir(), two.mkdir()
    cmds = [[sys.executable, "-m", "metric_ds.train", "--config", str(_config(one, no_dropout_model_dir, table, 8))],
            [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
             "metric_ds.train", "--config", str(_config(two, no_dropout_model_dir, table, 4))]]
    for cmd in cmds:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(x) for x in (two / "runs" / "acc" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/contrastive_batch"] for r in records if "train/contrastive_batch" in r][0] == 16
    expected = _weights(one)
    for name, tensor in _weights(two).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
