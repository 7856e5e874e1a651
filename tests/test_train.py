"""The training engine end to end on a tiny random BERT: ZeRO stages, precision, accumulation, clipping,
validation records, the best/ export, atomic checkpoints and exact resume."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_cfg, records, run
from safetensors.torch import load_file

from metric_ds.checkpoint import resolve_resume, save_checkpoint
from metric_ds.config import validate_config
from metric_ds.errors import UserError
from metric_ds.train import Trainer


# ZeRO 0 is the quick case; the other stages are the DeepSpeed grid (slow: still run by `make test`)
@pytest.mark.parametrize("stage", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (1, 2, 3))])
def test_zero_stages_train_validate_export(tmp_path, tiny_model_dir, tiny_table, stage):
    trainer, summary = run(tmp_path, tiny_model_dir, tiny_table, deepspeed__zero_stage=stage,
                           training__max_steps=4, training__eval_every_n_steps=2)
    run_dir = Path(summary["run_dir"])
    recs = records(run_dir)
    train_recs = [r for r in recs if "train/loss" in r]
    val_recs = [r for r in recs if "val/acc" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert len(val_recs) == 2
    for r in train_recs:
        for key in ("train/ce", "train/supcon", "train/lr", "train/grad_norm", "train/samples_per_s",
                    "train/ce_rows", "train/metric_rows", "train/anchor_pos_frac", "train/mean_pos_per_anchor"):
            assert key in r and r[key] == r[key], key  # present and not NaN
    v = val_recs[-1]
    for key in ("val/loss", "val/ce", "val/supcon", "val/f1", "val/recall@1", "val/recall@3", "val/knn_acc",
                "val/knn_f1", "bank/size"):
        assert key in v, key
    assert summary["steps"] == 4 and summary["best_step"] in (2, 4)
    # every stage steps our fused AdamW (DeepSpeed's own torch_adam path cannot fuse), and it took the steps
    optimizer = trainer.engine.basic_optimizer
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    assert any(optimizer.state.values())
    # best/ is a plain HF folder
    from transformers import AutoModel

    best = run_dir / "best"
    encoder = AutoModel.from_pretrained(best)
    assert encoder.config.hidden_size == 32
    assert {"labels.json", "metrics.json", "heads.safetensors", "tokenizer.json"} <= {p.name for p in best.iterdir()}
    heads = load_file(str(best / "heads.safetensors"))
    assert heads["classifier.weight"].shape == (4, 32)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()


def test_metric_only_run_keeps_best_by_knn_f1(tmp_path, tiny_model_dir, tiny_table):
    _, summary = run(tmp_path, tiny_model_dir, tiny_table, training__classification_loss_weight=0,
                     checkpointing__save_best_by="knn_f1", training__max_steps=4, training__eval_every_n_steps=2)
    vals = [r for r in records(Path(summary["run_dir"])) if "val/knn_f1" in r]
    best = max(vals, key=lambda r: r["val/knn_f1"])  # the first of equals wins: later ones are not better
    assert summary["best_metric"] == "val/knn_f1"
    assert (summary["best_step"], summary["best_value"]) == (best["step"], best["val/knn_f1"])
    assert (Path(summary["best_dir"]) / "heads.safetensors").is_file()


def test_heads_train_at_their_own_learning_rate(tmp_path, tiny_model_dir, tiny_table):
    trainer = Trainer(validate_config(make_cfg(tmp_path, tiny_model_dir, tiny_table, model__projection_dim=8,
                                               optimizer__head_learning_rate=0.02, scheduler__name="constant")))
    heads = {id(p) for m in (trainer.engine.module.classifier, trainer.engine.module.projection)
             for p in m.parameters()}
    seen = set()
    for group in trainer.engine.optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= heads or not ids & heads  # no group mixes heads and encoder
        assert group["lr"] == (0.02 if ids <= heads else 1e-3)
        assert group["weight_decay"] == (0.0 if all(p.ndim < 2 for p in group["params"]) else 0.01)
        seen |= ids
    assert seen == {id(p) for p in trainer.engine.module.parameters()}


def test_training_reduces_loss(tmp_path, tiny_model_dir, tiny_table):
    _, summary = run(tmp_path, tiny_model_dir, tiny_table, training__num_epochs=6, training__log_every_n_steps=9)
    recs = [r for r in records(Path(summary["run_dir"])) if "train/loss" in r]
    assert recs[-1]["train/loss"] < recs[0]["train/loss"]


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, tiny_model_dir, tiny_table):
    trainer, summary = run(tmp_path, tiny_model_dir, tiny_table, training__gradient_accumulation_steps=3,
                           training__num_epochs=1)
    micro = len(trainer.sampler)
    assert summary["steps"] == micro // 3
    assert trainer.engine.global_steps == micro // 3


def test_gradient_clipping_bounds_the_update(tmp_path, tiny_model_dir, tiny_table):
    """AdamW's first moment after one step is (1 - beta1) * the clipped gradient."""
    clip = 1e-3
    trainer, _ = run(tmp_path, tiny_model_dir, tiny_table, training__gradient_clip_val=clip,
                     training__max_steps=1, metric_validation__train_bank_steps=0)
    opt = trainer.engine.optimizer
    sq = sum(float(s["exp_avg"].float().pow(2).sum()) for s in opt.state.values())
    assert (sq ** 0.5) / 0.1 <= clip * 1.001
    rec = [r for r in records(trainer.run_dir) if "train/grad_norm" in r][0]
    assert rec["train/grad_norm"] > clip  # the logged norm is the one before clipping


def test_bf16_smoke(tmp_path, tiny_model_dir, tiny_table):
    _, summary = run(tmp_path, tiny_model_dir, tiny_table, training__mixed_precision="bf16", training__max_steps=2,
                     training__batch_size=4)
    assert summary["steps"] == 2
    # its best/ holds a bf16 encoder beside fp32 heads: loading it gives one fp32 model (it raised a dtype mismatch)
    import metric_ds

    model = metric_ds.load(tmp_path / "runs" / "t" / "best", device="cpu")
    assert {p.dtype for p in model.model.parameters()} == {torch.float32}
    assert model.predict(["card lost"]).probabilities.shape == (1, model.label_map.num_classes)


def test_fp16_without_gpu_is_a_clear_error(tmp_path, tiny_model_dir, tiny_table):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        run(tmp_path, tiny_model_dir, tiny_table, training__mixed_precision="fp16")


def test_unknown_model_name_is_a_clear_error(tmp_path, tiny_model_dir, tiny_table):
    with pytest.raises(UserError, match="neither a local directory nor a model in the local Hugging Face cache"):
        run(tmp_path, tiny_model_dir, tiny_table, model_name="someone/not-a-model-xyz")


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}


def test_exact_resume(tmp_path, tiny_model_dir, tiny_table):
    """Stopped after step 3 and resumed: the same records and weights as the uninterrupted 6-step run."""
    common = dict(training__max_steps=6, training__eval_every_n_steps=2, checkpointing__save_every_n_batches=3,
                  checkpointing__keep_last_n_checkpoints=5, training__num_epochs=3)
    full, _ = run(tmp_path / "a", tiny_model_dir, tiny_table, **common)
    full_weights = _weights(full)
    full_recs = records(full.run_dir)
    ckpt = full.run_dir / "checkpoints" / "step-3"
    assert ckpt.is_dir()
    resumed, summary = run(tmp_path / "b", tiny_model_dir, tiny_table, training__resume_from=str(ckpt), **common)
    assert summary["steps"] == 6
    later = [r for r in records(resumed.run_dir)]
    expected = [r for r in full_recs if r["step"] > 3]
    strip = lambda r: {k: v for k, v in r.items() if "samples_per_s" not in k and "step_time" not in k}
    assert [strip(r) for r in later] == [strip(r) for r in expected]
    for name, tensor in _weights(resumed).items():
        torch.testing.assert_close(tensor, full_weights[name], rtol=0, atol=0, msg=name)


def test_atomic_checkpoint_survives_a_crash_mid_save(tmp_path, tiny_model_dir, tiny_table, monkeypatch):
    trainer, _ = run(tmp_path, tiny_model_dir, tiny_table, training__max_steps=2,
                     checkpointing__save_every_n_batches=2)
    root = trainer.run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step-2"

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(trainer.engine, "save_checkpoint", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        save_checkpoint(trainer.engine, trainer.run_dir, 3, trainer._client_state(), keep_last=2)
    assert (root / "latest").read_text() == "step-2"
    assert resolve_resume("latest", trainer.run_dir) == root / "step-2"
    assert not (root / "step-3").exists()


def test_resume_from_nothing_is_a_clear_error(tmp_path, tiny_model_dir, tiny_table):
    with pytest.raises(UserError, match="no checkpoint found"):
        run(tmp_path, tiny_model_dir, tiny_table, training__resume_from=str(tmp_path / "nowhere"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_under_zero_reads_weights_only(tmp_path, tiny_model_dir, tiny_table, stage, monkeypatch):
    """A ZeRO-2/3 checkpoint resumes, and every file is read with torch.load(weights_only=True)."""
    common = dict(deepspeed__zero_stage=stage, training__max_steps=4, checkpointing__save_every_n_batches=2,
                  checkpointing__keep_last_n_checkpoints=5)
    first, _ = run(tmp_path / "a", tiny_model_dir, tiny_table, **common)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    _, summary = run(tmp_path / "b", tiny_model_dir, tiny_table,
                     training__resume_from=str(first.run_dir / "checkpoints" / "step-2"), **common)
    assert summary["steps"] == 4
    assert seen and all(flag is True for flag in seen), seen
