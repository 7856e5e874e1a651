"""A checkpoint written by W processes resumes with another W (ZeRO 0 natively, ZeRO 2 through DeepSpeed's
universal checkpoint, converted on demand). The weights and optimizer state resume exactly; what follows cannot
equal the uninterrupted run (the global batch is batch_size x W, so the remaining batches and their number differ,
and the RNG streams start afresh), so the test checks that the resumed run trains to a validation loss within 10%
of the uninterrupted run's, a margin well above the spread of these 6-step tiny runs (~2%) and well below an
untrained model's distance (~25%)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import launch, make_cfg, make_frame, write_cfg

from metric_ds.config import validate_config
from metric_ds.train import Trainer

pytestmark = pytest.mark.slow


def _config(root: Path, model_dir: Path, table: Path, stage: int) -> dict:
    return make_cfg(root, model_dir, table, run_name="x", data__val_ratio=0.1, training__batch_size=4,
                    training__num_epochs=1, training__max_steps=6, training__supcon_impl="auto",
                    deepspeed__zero_stage=stage, checkpointing__save_every_n_batches=3,
                    checkpointing__keep_last_n_checkpoints=5)


def _launch(world: int, cfg: dict, root: Path, *sets: str) -> Path:
    launch(write_cfg(root / "cfg.yaml", cfg), world, *sum((["--set", s] for s in sets), []))
    return root / "runs" / "x"


def _final_val_loss(run_dir: Path) -> float:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val/loss"] for r in records if "val/loss" in r][-1]


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(tmp_path, tiny_model_dir, stage, saved, resumed):
    table = tmp_path / "t.parquet"
    make_frame(96).to_parquet(table)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    full = _launch(saved, _config(first, tiny_model_dir, table, stage), first)
    ckpt = full / "checkpoints" / "step-3"
    cont = _launch(resumed, _config(second, tiny_model_dir, table, stage), second,
                   f"training.resume_from={ckpt}")
    summary = json.loads((cont / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == resumed
    assert _final_val_loss(cont) == pytest.approx(_final_val_loss(full), rel=0.10)
    assert (ckpt / "ds_universal").is_dir() == (stage > 0)


def test_weights_and_moments_resume_exactly_on_one_process(tmp_path, tiny_model_dir):
    """ZeRO 2, saved by 2 processes: after loading on 1, the weights and Adam moments are the saved ones."""
    table = tmp_path / "t.parquet"
    make_frame(96).to_parquet(table)
    first = tmp_path / "first"
    first.mkdir()
    cfg = _config(first, tiny_model_dir, table, 2)
    ckpt = _launch(2, cfg, first) / "checkpoints" / "step-3"
    saved = torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    cfg["checkpointing"]["checkpoints_dir"] = str(tmp_path / "second")
    cfg["training"]["resume_from"] = str(ckpt)
    trainer = Trainer(validate_config(cfg))
    module = trainer.engine.module.state_dict()
    for name, tensor in saved.items():
        torch.testing.assert_close(module[name], tensor, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(module[name].float(), fp32[name].float(), rtol=0, atol=0, msg=name)
    from deepspeed.utils import safe_get_full_optimizer_state

    total = 0.0
    for name, param in trainer.engine.module.named_parameters():  # the Adam moments of the two saved partitions
        for key in ("exp_avg", "exp_avg_sq"):
            expected = torch.load(ckpt / "ds_universal" / "zero" / name / f"{key}.pt", weights_only=False)["param"]
            got = safe_get_full_optimizer_state(param, key)
            total += float(expected.abs().sum())  # 0 for the unused pooler (mean pooling): no gradient, no moments
            torch.testing.assert_close(got.view_as(expected), expected, rtol=0, atol=0, msg=f"{name} {key}")
    assert total > 0  # the moments came back, not a fresh optimizer
