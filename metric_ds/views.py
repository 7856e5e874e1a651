"""The second view of a batch's label-free rows: the same tokens forwarded again, so dropout draws another mask.

A label-free row (``labels`` = :data:`~metric_ds.data.labels.LABEL_FREE`, ``metric_mask = 1``) is a SupCon class of
its own whose positive is this view (:mod:`metric_ds.losses`). The view's inputs are cut from the collated batch on
the CPU, before it moves (finding the rows on a device tensor would make the host wait), and padded only to the
longest label-free row. The cost is one more forward of those rows only, and the backward through it; a batch
without them costs nothing (`benchmarks/bench_label_free.py`).
"""
from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from metric_ds.data.labels import LABEL_FREE
from metric_ds.errors import UserError
from metric_ds.model import MODEL_INPUTS

Batch = dict[str, torch.Tensor]


def view_inputs(batch: Batch, device: torch.device) -> Batch | None:
    """The model inputs of the label-free rows of the CPU ``batch`` (in row order), on ``device``; None when the
    batch has none."""
    free = batch["metric_mask"] & (batch["labels"] == LABEL_FREE)
    if not bool(free.any()):
        return None
    idx = free.nonzero().squeeze(1)
    length = int(batch["attention_mask"][idx].sum(1).max())  # rows are padded on the right
    view = {k: batch[k][idx, :length] for k in MODEL_INPUTS if k in batch}
    if device.type == "cuda":  # from pinned memory, without waiting (as the loaders' batches)
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in view.items()}
    return {k: v.to(device) for k, v in view.items()}


def forward_view(engine: Any, view: Batch | None) -> torch.Tensor | None:
    """``z`` of a second forward of the view's rows (in the engine's current mode: train, so dropout is drawn
    afresh), or None without a view."""
    return None if view is None else engine(**view).z


def check_views_supported(train: pd.DataFrame, zero_stage: int, world_size: int) -> None:
    """Refuse label-free rows where the second view cannot run: under ZeRO-3 every forward gathers the parameters
    with every rank, and a rank whose micro-batch has no label-free row makes no second forward.

    Args:
        train: the training split (``label_id`` :data:`~metric_ds.data.labels.LABEL_FREE` marks label-free rows).
        zero_stage, world_size: ``deepspeed.zero_stage`` and the number of processes.

    Raises:
        UserError: naming the keys and the fixes.
    """
    label_free_rows = int((train["label_id"] == LABEL_FREE).sum())
    if label_free_rows and zero_stage == 3 and world_size > 1:
        raise UserError(f"the training data hold {label_free_rows} label-free row(s) (null label), whose second view "
                        f"is a forward of each rank's label-free rows only, and deepspeed.zero_stage is 3 on "
                        f"{world_size} processes, where every forward must be made by every rank: set "
                        "deepspeed.zero_stage to 0, 1 or 2, train on one process, or give those rows labels")
