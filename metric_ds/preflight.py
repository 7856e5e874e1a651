"""Checks that need no data and no engine, run by ``metric-ds validate`` and at the start of training, so that
a run fails in its first second rather than hours in: precision against the hardware, the model folder, the
sequence length against the model's position limit, and a writable run folder.
"""
from __future__ import annotations

from metric_ds.config import Config
from metric_ds.ds_config import check_precision
from metric_ds.errors import UserError
from metric_ds.model import resolve_model_name
from metric_ds.run_folder import rerun_problem, writable_problem


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
