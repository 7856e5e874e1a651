"""Datasets and batching: texts tokenised once, padded per batch to the batch's longest (dynamic padding)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

_TOKEN_KEYS = ("input_ids", "token_type_ids")
_ROW_KEYS = {"labels": torch.int64, "metric_mask": torch.bool, "classifier_mask": torch.bool, "index": torch.int64}


class TextDataset(torch.utils.data.Dataset):
    """Pre-tokenised rows (tokenising once is much faster than per batch, every epoch).

    Args:
        encodings: per-row token lists: ``input_ids`` and, if the tokenizer gives them, ``token_type_ids``.
        labels: encoded classes, shape (N,).
        metric_mask, classifier_mask: 0/1 per row, shape (N,).
        index: row ids, shape (N,), returned with each row so that outputs can be matched to rows.
    """

    def __init__(self, encodings: dict[str, list[list[int]]], labels: np.ndarray, metric_mask: np.ndarray,
                 classifier_mask: np.ndarray, index: np.ndarray):
        self.encodings = encodings
        self.labels = np.asarray(labels, dtype=np.int64)
        self.metric_mask = np.asarray(metric_mask).astype(bool)
        self.classifier_mask = np.asarray(classifier_mask).astype(bool)
        self.index = np.asarray(index, dtype=np.int64)
        n = len(self.labels)
        lengths = {k: len(v) for k, v in encodings.items()}
        lengths.update(metric_mask=len(self.metric_mask), classifier_mask=len(self.classifier_mask),
                       index=len(self.index))
        if any(v != n for v in lengths.values()):
            raise ValueError(f"TextDataset: every field needs {n} rows (one per label), got {lengths}")

    @classmethod
    def from_frame(cls, df: pd.DataFrame, tokenizer: Any, max_seq_length: int) -> TextDataset:
        """Tokenise a validated, encoded frame (columns text, label_id, metric_mask, classifier_mask).

        Texts are truncated to ``max_seq_length`` tokens (special tokens included); row ids are 0..N-1.
        """
        if "label_id" not in df.columns:
            raise ValueError("TextDataset.from_frame needs a label_id column (encode labels with LabelMap first)")
        enc = tokenizer(df["text"].tolist(), truncation=True, max_length=max_seq_length,
                        return_attention_mask=False)
        keep = {k: list(enc[k]) for k in _TOKEN_KEYS if k in enc}
        return cls(keep, df["label_id"].to_numpy(), df["metric_mask"].to_numpy(), df["classifier_mask"].to_numpy(),
                   np.arange(len(df)))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> list[int]:
        """Tokens per row (for length-sorted batches)."""
        return [len(ids) for ids in self.encodings["input_ids"]]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        item.update(labels=int(self.labels[i]), metric_mask=bool(self.metric_mask[i]),
                    classifier_mask=bool(self.classifier_mask[i]), index=int(self.index[i]))
        return item


class Collator:
    """Pads a list of rows to the longest in the batch (not to ``max_seq_length``).

    Rows are :class:`TextDataset` items, tokenised (and truncated) once when the dataset was built.

    Args:
        tokenizer: a Hugging Face tokenizer (its ``pad_token_id`` pads).

    Returns:
        (from ``__call__``) ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the rows have them):
        (B, L) int64 with L the batch's longest row; ``labels``, ``index``: (B,) int64; ``metric_mask``,
        ``classifier_mask``: (B,) bool (each only when the rows have it).
    """

    def __init__(self, tokenizer: Any):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(rows)
        length = max((len(r["input_ids"]) for r in rows), default=1)
        ids = torch.full((n, length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((n, length), dtype=torch.int64)
        has_tt = bool(rows) and "token_type_ids" in rows[0]
        tt = torch.zeros((n, length), dtype=torch.int64) if has_tt else None
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.as_tensor(r["input_ids"], dtype=torch.int64)
            mask[i, :k] = 1
            if has_tt:
                tt[i, :k] = torch.as_tensor(r["token_type_ids"], dtype=torch.int64)
        out = {"input_ids": ids, "attention_mask": mask}
        if has_tt:
            out["token_type_ids"] = tt
        for key, dtype in _ROW_KEYS.items():
            if not rows or key in rows[0]:  # rows to predict on have no labels or masks
                out[key] = torch.tensor([r[key] for r in rows], dtype=dtype)
        return out


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row positions grouped into batches of similar length, longest first.

    Padding to each batch's longest row then wastes little, and a batch that does not fit in memory shows at
    once. The sort is stable, so equal lengths keep their order; callers restore row order from the positions.
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
