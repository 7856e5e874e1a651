"""Checks that need no data and no engine, run by ``metric-ds validate`` and at the start of training, so that
a run fails in its first second rather than hours in: precision against the hardware, the model folder, the
sequence length against the model's position limit, and a writable run folder.

The sequence-length check (:func:`check_max_seq_length`) is also every command's that takes ``--max-seq-length``
(``evaluate``, ``pseudo-label``) and ``metric_ds.load``'s.
"""
from __future__ import annotations

import operator
from typing import Any

import torch

from metric_ds.config import Config, schema_field
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


def encoder_positions(config: Any) -> int | None:
    """The longest input, in tokens, that an encoder with this Hugging Face config can read (None where its
    position embeddings set no limit)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if "roberta" in getattr(config, "model_type", "") or config.model_type in ("camembert", "longformer"):
        limit -= (getattr(config, "pad_token_id", 1) or 1) + 1  # positions start after the padding index
    return int(limit)


def seq_length_problem(value: int, config: Any, key: str, model: str) -> str | None:
    """What is wrong with truncating at ``value`` tokens for an encoder, or None: below the training schema's
    bound on ``training.max_seq_length`` (a text needs its start and end tokens), or beyond the encoder's
    position embeddings.

    Args:
        value: the truncation length.
        config: the encoder's Hugging Face config (``encoder.config``, ``AutoConfig.from_pretrained``).
        key: the key or flag that gave ``value`` (``training.max_seq_length``, ``--max-seq-length``).
        model: the model's name or folder, for the message.
    """
    for bound in schema_field("training.max_seq_length").metadata:
        for name, sign, holds in (("gt", ">", operator.gt), ("ge", ">=", operator.ge)):
            if hasattr(bound, name) and not holds(value, getattr(bound, name)):
                return f"{key} must be {sign} {getattr(bound, name)}, got {value}"
    limit = encoder_positions(config)
    if limit is not None and value > limit:
        return (f"{key}: {value} is longer than the model ({model}) can read: its position embeddings end at "
                f"{limit} tokens. Set it to at most {limit}")
    return None


def check_max_seq_length(value: int, config: Any, key: str, model: str) -> None:
    """Refuse a truncation length that the encoder cannot read (:func:`seq_length_problem`).

    Raises:
        UserError: naming ``key``, the value and the bound.
    """
    problem = seq_length_problem(value, config, key, model)
    if problem:
        raise UserError(problem)


def preflight(cfg: Config) -> None:
    """Every problem of ``cfg`` with this machine and model, at once.

    Raises:
        UserError: naming each key and its fix.
    """
    from transformers import AutoConfig

    check_precision(cfg)
    path = resolve_model_name(cfg.model_name)
    encoder = AutoConfig.from_pretrained(path, local_files_only=True)
    problems = [seq_length_problem(cfg.training.max_seq_length, encoder, "training.max_seq_length", path),
                writable_problem(cfg.run_dir, "checkpointing.checkpoints_dir"),
                rerun_problem(cfg.run_dir, bool(cfg.training.resume_from), cfg.checkpointing.overwrite)]
    problems = [problem for problem in problems if problem]
    if problems:
        raise UserError(problems)
