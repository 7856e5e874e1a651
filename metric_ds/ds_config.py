"""Build the DeepSpeed config from ours: one mapping, so DeepSpeed's keys are never set in two places.

Which DeepSpeed keys we decide, and from which of our keys, is the table
:data:`metric_ds.config.DEEPSPEED_OWNED`, beside the schema that refuses them in ``deepspeed.config``.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from metric_ds.config import DEEPSPEED_OWNED, Config


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


def build_ds_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` (the passthrough ``deepspeed.config`` merged last)."""
    ds: dict[str, Any] = {"steps_per_print": 10**9, "wall_clock_breakdown": False}
    for path, _, value in DEEPSPEED_OWNED:
        if value is not None:
            _set(ds, path, value(cfg))
    if not torch.cuda.is_available() and cfg.deepspeed.zero_stage > 0:
        ds["zero_optimization"].setdefault("overlap_comm", False)
    return _merge(ds, cfg.deepspeed.config)
