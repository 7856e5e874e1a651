"""Checks that need no data and no engine, run by ``metric-ds validate`` and at the start of training, so that
a run fails in its first second rather than hours in: precision against the hardware, the model folder, the
sequence length against the model's position limit, and a writable run folder.
"""
from __future__ import annotations

import torch

from metric_ds.config import Config
from metric_ds.errors import UserError
from metric_ds.model import check_attention, resolve_model_name
from metric_ds.run_folder import rerun_problem, writable_problem


def check_precision(cfg: Config) -> None:
    """Refuse what this machine cannot run: fp16 without a GPU (DeepSpeed refuses it on CPU), and
    ``flash_attention_2`` without a GPU, its package, or fp16/bf16 (:func:`metric_ds.model.check_attention`).

    Raises:
        UserError: naming ``training.mixed_precision`` or ``training.attention_implementation`` and the fix.
    """
    if cfg.training.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError(
            "training.mixed_precision: fp16 needs a CUDA GPU and none is available here; "
            "use bf16 (slow on CPUs without native bf16) or no"
        )
    check_attention(cfg.training.attention_implementation, cfg.training.mixed_precision)


def position_limit(model_path: str) -> int | None:
    """The longest input, in tokens, that the model's position embeddings allow (None where it has none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if "roberta" in getattr(config, "model_type", "") or config.model_type in ("camembert", "longformer"):
        limit -= (getattr(config, "pad_token_id", 1) or 1) + 1  # positions start after the padding index
    return int(limit)


def preflight(cfg: Config) -> None:
    """Every problem of ``cfg`` with this machine and model, at once.

    Raises:
        UserError: naming each key and its fix.
    """
    check_precision(cfg)
    path = resolve_model_name(cfg.model_name)
    problems = []
    limit = position_limit(path)
    if limit is not None and cfg.training.max_seq_length > limit:
        problems.append(f"training.max_seq_length: {cfg.training.max_seq_length} is longer than the model "
                        f"({path}) can read: its position embeddings end at {limit} tokens. Set it to at most {limit}")
    unwritable = writable_problem(cfg.run_dir, "checkpointing.checkpoints_dir")
    if unwritable:
        problems.append(unwritable)
    rerun = rerun_problem(cfg.run_dir, bool(cfg.training.resume_from), cfg.checkpointing.overwrite)
    if rerun:
        problems.append(rerun)
    if problems:
        raise UserError(problems)
