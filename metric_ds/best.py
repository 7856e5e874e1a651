"""The best model of a run: whether a validation beats the best so far (decided on rank 0 and broadcast), the full
weights (gathered under ZeRO-3), and their export to the run's ``best/`` folder, swapped in whole
(:func:`metric_ds.run_folder.swap_in_best`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from metric_ds import distributed as D
from metric_ds import run_folder
from metric_ds.artifact import save_model
from metric_ds.config import Config
from metric_ds.data.labels import LabelMap
from metric_ds.errors import UserError, describe_io_error, io_errno
from metric_ds.metrics import lower_is_better
from metric_ds.outputs import io_fix


def is_better(value: float | None, best: float | None, key: str) -> bool:
    """Whether ``value`` of metric ``key`` beats ``best`` (None: nothing yet). A missing or NaN value never does;
    an equal one does not (the first of equals is kept)."""
    return value is not None and not math.isnan(value) and (
        best is None or (value < best if lower_is_better(key) else value > best))


def full_state_dict(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full weights on every rank, on the CPU; under ZeRO-3 the partitions are gathered first (a collective)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def write_best(folder: Path, state_dict: dict[str, torch.Tensor], module: torch.nn.Module, tokenizer: Any,
               cfg: Config, label_map: LabelMap, record: dict[str, float], step: int) -> None:
    """Write one ``best/`` folder (:func:`metric_ds.artifact.save_model`): the model, its labels, the validation
    record that chose it, the training data's path and the config."""
    save_model(folder, module, tokenizer, label_map=label_map, state_dict=state_dict, config=cfg,
               metrics={"step": step, **record}, train_table=cfg.data.train_path)


class BestKeeper:
    """Decides whether a validation is the best so far and exports it to ``run_dir/best``.

    Args:
        cfg: the run's config (``checkpointing.save_best_by`` names the metric).
        run_dir: the run folder.
        engine: the DeepSpeed engine (its module is exported).
        tokenizer: saved with the model.
        label_map: the run's labels.
    """

    def __init__(self, cfg: Config, run_dir: Path, engine: Any, tokenizer: Any, label_map: LabelMap):
        self.cfg, self.run_dir, self.engine, self.tokenizer, self.label_map = cfg, run_dir, engine, tokenizer, label_map
        self.key = cfg.checkpointing.save_best_by

    def improved(self, metrics: dict[str, float], best: float | None) -> bool:
        """Whether ``metrics`` beat ``best``: decided on rank 0 and broadcast, so that ranks whose float metrics
        differ in the last bit never disagree (the export that follows is a collective)."""
        return D.broadcast_flag(is_better(metrics.get(self.key), best, self.key), self.engine.device)

    def save(self, record: dict[str, float], step: int) -> None:
        """Export the current weights to ``best/`` with the validation ``record`` of ``step`` (a collective)."""
        module = self.engine.module
        state_dict = full_state_dict(module, self.cfg.deepspeed.zero_stage)
        if D.is_main():
            def write(folder: Path) -> None:
                write_best(folder, state_dict, module, self.tokenizer, self.cfg, self.label_map, record, step)

            had_best = (self.run_dir / run_folder.BEST).is_dir()
            try:
                run_folder.swap_in_best(self.run_dir, write)
            except Exception as exc:  # safetensors and tokenizers raise their own errors on a full disk
                if not isinstance(exc, (OSError, SafetensorError)) and io_errno(exc) is None:
                    raise
                kept = "the previous best/ is intact" if had_best else "there is no best/ yet"
                raise UserError(f"could not export best/ to {self.run_dir}: {describe_io_error(exc, self.run_dir)} "
                                f"({kept}); {io_fix(exc)} (checkpointing.checkpoints_dir)") from None
        if D.is_dist():
            torch.distributed.barrier()
