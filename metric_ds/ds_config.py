"""Build the DeepSpeed config from ours: one mapping, so DeepSpeed's keys are never set in two places."""
from __future__ import annotations

import copy
from typing import Any

import torch

from metric_ds.config import Config
from metric_ds.errors import UserError


def check_precision(cfg: Config) -> None:
    """Refuse, before anything is loaded, what this machine cannot run: fp16 without a GPU (DeepSpeed refuses it
    on CPU), and ``flash_attention_2`` without a GPU, its package, or fp16/bf16
    (:func:`metric_ds.model.check_attention`). ``metric-ds validate`` and ``metric-ds train`` both call this."""
    from metric_ds.model import check_attention

    if cfg.training.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError(
            "training.mixed_precision: fp16 needs a CUDA GPU and none is available here; "
            "use bf16 (slow on CPUs without native bf16) or no"
        )
    check_attention(cfg.training.attention_implementation, cfg.training.mixed_precision)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_ds_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` (the passthrough ``deepspeed.config`` merged last)."""
    t = cfg.training
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.gradient_clip_val,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "optimizer": {
            # torch's AdamW: DeepSpeed's fused CPU/CUDA Adam would need a JIT build on first use.
            "type": "AdamW",
            "params": {"lr": cfg.optimizer.learning_rate, "weight_decay": cfg.optimizer.weight_decay,
                       "torch_adam": True},
        },
        "bf16": {"enabled": t.mixed_precision == "bf16"},
        "fp16": {"enabled": t.mixed_precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not torch.cuda.is_available() and cfg.deepspeed.zero_stage > 0:
        ds["zero_optimization"].setdefault("overlap_comm", False)
    return _merge(ds, cfg.deepspeed.config)
