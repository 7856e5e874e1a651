"""Datasets and batching: texts tokenised once, padded per batch to the batch's longest (dynamic padding)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch


class TextDataset(torch.utils.data.Dataset):
    """Pre-tokenised rows.

    Args:
        encodings: per-row token lists (``input_ids`` and, if the tokenizer gives them, ``token_type_ids``).
        labels: encoded classes; metric_mask, classifier_mask: 0/1; index: row ids.
    """

    def __init__(self, encodings: dict[str, list[list[int]]], labels: np.ndarray, metric_mask: np.ndarray,
                 classifier_mask: np.ndarray, index: np.ndarray):
        self.encodings = encodings
        self.labels = np.asarray(labels, dtype=np.int64)
        self.metric_mask = np.asarray(metric_mask).astype(bool)
        self.classifier_mask = np.asarray(classifier_mask).astype(bool)
        self.index = np.asarray(index, dtype=np.int64)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, tokenizer: Any, max_seq_length: int) -> TextDataset:
        """Tokenise a validated, encoded frame (columns text, label_id, metric_mask, classifier_mask)."""
        enc = tokenizer(df["text"].tolist(), truncation=True, max_length=max_seq_length,
                        return_attention_mask=False)
        keep = {k: v for k, v in enc.items() if k in ("input_ids", "token_type_ids")}
        return cls(keep, df["label_id"].to_numpy(), df["metric_mask"].to_numpy(), df["classifier_mask"].to_numpy(),
                   np.arange(len(df)))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        item.update(labels=int(self.labels[i]), metric_mask=bool(self.metric_mask[i]),
                    classifier_mask=bool(self.classifier_mask[i]), index=int(self.index[i]))
        return item


class Collator:
    """Pads a list of rows to the longest in the batch.

    Returns:
        ``input_ids``, ``attention_mask`` (and ``token_type_ids``): (B, L) int64; ``labels``, ``index``: (B,)
        int64; ``metric_mask``, ``classifier_mask``: (B,) bool.
    """

    def __init__(self, tokenizer: Any, max_seq_length: int):
        self.pad_id = tokenizer.pad_token_id or 0
        self.max_seq_length = max_seq_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max((len(r["input_ids"]) for r in rows), default=1)
        n = len(rows)
        ids = torch.full((n, length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((n, length), dtype=torch.int64)
        has_tt = bool(rows) and "token_type_ids" in rows[0]
        tt = torch.zeros((n, length), dtype=torch.int64) if has_tt else None
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.as_tensor(r["input_ids"])
            mask[i, :k] = 1
            if has_tt:
                tt[i, :k] = torch.as_tensor(r["token_type_ids"])
        out = {"input_ids": ids, "attention_mask": mask}
        if has_tt:
            out["token_type_ids"] = tt
        out["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.int64)
        out["metric_mask"] = torch.tensor([r["metric_mask"] for r in rows], dtype=torch.bool)
        out["classifier_mask"] = torch.tensor([r["classifier_mask"] for r in rows], dtype=torch.bool)
        out["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.int64)
        return out
