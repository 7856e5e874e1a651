"""Build the DeepSpeed config from ours: one mapping, so DeepSpeed's keys are never set in two places."""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from metric_ds.errors import UserError

if TYPE_CHECKING:
    from metric_ds.config import Config


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


def _set(ds: dict[str, Any], path: str, value: Any) -> None:
    head, _, tail = path.partition(".")
    if tail:
        _set(ds.setdefault(head, {}), tail, value)
    else:
        ds[head] = value


# The DeepSpeed keys our config decides: (DeepSpeed key path, our key that sets it, its value or None where
# DeepSpeed derives it or we pass an object instead). The one table of them: the builder writes these and the
# config refuses them in the passthrough ``deepspeed.config``.
_OWNED: tuple[tuple[str, str, Callable[[Config], Any] | None], ...] = (
    ("train_micro_batch_size_per_gpu", "training.batch_size", lambda c: c.training.batch_size),
    ("train_batch_size", "training.batch_size and training.gradient_accumulation_steps", None),
    ("gradient_accumulation_steps", "training.gradient_accumulation_steps",
     lambda c: c.training.gradient_accumulation_steps),
    ("gradient_clipping", "training.gradient_clip_val", lambda c: c.training.gradient_clip_val),
    ("fp16", "training.mixed_precision", lambda c: {"enabled": c.training.mixed_precision == "fp16"}),
    ("bf16", "training.mixed_precision", lambda c: {"enabled": c.training.mixed_precision == "bf16"}),
    ("optimizer", "optimizer.*", None),  # our fused torch AdamW is passed to deepspeed.initialize (train._make_optimizer)
    ("scheduler", "scheduler.*", None),  # our transformers scheduler is passed to deepspeed.initialize
    ("zero_optimization.stage", "deepspeed.zero_stage", lambda c: c.deepspeed.zero_stage),
)
OWNED_KEYS: dict[str, str] = {path: ours for path, ours, _ in _OWNED}


def build_ds_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` (the passthrough ``deepspeed.config`` merged last)."""
    ds: dict[str, Any] = {"steps_per_print": 10**9, "wall_clock_breakdown": False}
    for path, _, value in _OWNED:
        if value is not None:
            _set(ds, path, value(cfg))
    if not torch.cuda.is_available() and cfg.deepspeed.zero_stage > 0:
        ds["zero_optimization"].setdefault("overlap_comm", False)
    return _merge(ds, cfg.deepspeed.config)
