"""Run a model over texts: the one way ``metric_ds.load``, ``metric-ds evaluate`` and pseudo-labelling do it.

:func:`encode` tokenises the texts once (truncating at ``max_seq_length``), runs them in batches of similar
length (longest first, so padding costs little and a batch that does not fit shows at once) on a device (a GPU
when there is one), with the house progress bar, and returns every output in input order, on the CPU, as
float32. Validation (:mod:`metric_ds.evaluator`) shards its batches over ranks instead, but plans them and runs
each one with the same :func:`row_batches` and :func:`forward_batch`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from metric_ds.data.collate import Collator, length_sorted_batches
from metric_ds.model import MetricClassifier, ModelOutput, model_inputs
from metric_ds.progress import progress_bar

OUTPUTS = ("logits", "h", "z")
PROGRESS_MIN_ROWS = 1000  # show a progress bar from this many texts on (show_progress=None)
_TOKEN_KEYS = ("input_ids", "token_type_ids")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device`; ``None``: the first GPU when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def row_batches(n: int, batch_size: int, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Row positions ``0..n-1`` in batches: of similar length, longest first, given ``lengths``; else in order."""
    if lengths is not None:
        return length_sorted_batches(lengths, batch_size)
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def forward_batch(model: Callable[..., ModelOutput | torch.Tensor], batch: dict[str, torch.Tensor],
                  device: torch.device) -> dict[str, torch.Tensor]:
    """One forward of a collated batch on ``device``: float32 outputs by name, on ``device``.

    Args:
        model: a :class:`~metric_ds.model.MetricClassifier` (outputs ``logits``, ``h``, ``z``), or any callable
            of the model inputs that returns one embedding tensor (output ``z``).
    """
    out = model(**model_inputs(batch, device))
    if isinstance(out, torch.Tensor):
        return {"z": out.float()}
    return {name: getattr(out, name).float() for name in OUTPUTS}


def empty_outputs(model: Any) -> dict[str, torch.Tensor]:
    """What :func:`encode` returns for no texts: (0, D) tensors for a ``MetricClassifier``, else nothing."""
    if not isinstance(model, MetricClassifier):
        return {}
    return {name: torch.zeros(0, dim) for name, dim in model.output_dims().items()}


def encode(model: Callable[..., ModelOutput | torch.Tensor], tokenizer: Any, texts: Sequence[str],
           max_seq_length: int, batch_size: int, device: str | torch.device | None = None, *,
           length_sorted: bool = True, show_progress: bool | None = None, bar: Any = None,
           desc: str = "encoding", out_device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Run ``model`` over ``texts`` in batches; outputs in input order.

    The model must already be on ``device`` and in eval mode; each forward runs under ``torch.inference_mode``.

    Args:
        model: see :func:`forward_batch`.
        tokenizer: the model's tokenizer (its pad token pads).
        texts: strings.
        max_seq_length: truncation length in tokens (special tokens included).
        batch_size: texts per forward.
        device: where the model is; ``None``: :func:`pick_device`'s choice.
        length_sorted: batch texts of similar length together (``False``: in input order).
        show_progress: a progress bar; ``None``: from :data:`PROGRESS_MIN_ROWS` texts on.
        bar: an outer progress bar to advance instead (the CLI's, over a whole file).
        desc: the progress bar's label.
        out_device: where the outputs are gathered. The CPU by default; a caller that goes on computing on the
            model's device (metrics over the whole table) passes that device and saves a round trip, and a sync
            per batch.

    Returns:
        float32 tensors on ``out_device``, shape (N, D), by name: ``logits``, ``h``, ``z`` (or ``z`` alone).
    """
    n = len(texts)
    if n == 0:
        return {name: value.to(out_device) for name, value in empty_outputs(model).items()}
    device = pick_device(device)
    enc = tokenizer(list(texts), truncation=True, max_length=max_seq_length, return_attention_mask=False)
    keys = [k for k in _TOKEN_KEYS if k in enc]
    lengths = [len(ids) for ids in enc["input_ids"]]
    collate = Collator(tokenizer)
    own = bar is None
    if own:
        enabled = n >= PROGRESS_MIN_ROWS if show_progress is None else show_progress
        bar = progress_bar(n, desc, unit="texts", enabled=enabled)
    out: dict[str, torch.Tensor] = {}
    try:
        for rows in row_batches(n, batch_size, lengths if length_sorted else None):
            batch = collate([{k: enc[k][i] for k in keys} for i in rows])
            with torch.inference_mode():
                result = {name: value.to(out_device) for name, value in forward_batch(model, batch, device).items()}
            index = torch.as_tensor(rows, device=out_device)
            for name, value in result.items():
                if name not in out:
                    out[name] = torch.empty((n, value.shape[1]), dtype=torch.float32, device=out_device)
                out[name][index] = value
            bar.update(len(rows))
    finally:
        if own:
            bar.close()
    return out
