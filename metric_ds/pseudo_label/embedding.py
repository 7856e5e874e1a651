"""Embedding the rows to pseudo-label: the bundled MiniLM or a metric_ds export, batched, in input order."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class TextEmbedder:
    """A sentence embedder: the bundled MiniLM (mean pooling + L2 normalisation, as sentence-transformers'
    all-MiniLM-L6-v2 does) or a metric_ds export (its SupCon embedding ``z``).

    Args:
        model: a HF encoder (``kind="encoder"``) or a :class:`metric_ds.model.MetricClassifier` (``"export"``).
        tokenizer: its tokenizer.
        kind: which of the two ``model`` is.
    """

    def __init__(self, model: Any, tokenizer: Any, kind: str):
        self.model, self.tokenizer, self.kind = model, tokenizer, kind

    def __call__(self, input_ids: Any, attention_mask: Any, **extra: Any) -> Any:
        """Unit-norm embeddings, shape (B, dim), float32."""
        import torch.nn.functional as F

        if self.kind == "export":
            return self.model(input_ids, attention_mask, extra.get("token_type_ids")).z
        states = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return F.normalize(((states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)).float(), dim=-1)


def load_embedder(model: str | Path | None) -> TextEmbedder:
    """The bundled MiniLM (``None``), a metric_ds export (a folder with ``heads.json``, e.g. ``RUN/best``), or
    any local HF encoder folder (mean pooling)."""
    from metric_ds.model import HEADS_META, load_encoder, load_exported

    if model is not None and (Path(model) / HEADS_META).is_file():
        net, tok = load_exported(model)
        return TextEmbedder(net, tok, "export")
    net, tok = load_encoder(None if model is None else str(model))
    return TextEmbedder(net.eval(), tok, "encoder")


def embed_texts(model: TextEmbedder, texts: list[str], batch_size: int = 128, max_seq_length: int = 128,
                device: Any = None) -> np.ndarray:
    """Embed texts in batches, with a progress bar, on the GPU when there is one (``device=None``).

    The batching is inference's (:func:`metric_ds.data.collate.length_sorted_batches`, longest first, so a batch
    that does not fit shows at once and each batch pads little); the output keeps the input order.

    Returns:
        float32 array, shape (N, dim), rows of unit norm.
    """
    import torch

    from metric_ds.data.collate import Collator, length_sorted_batches
    from metric_ds.progress import progress_bar

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.model.to(device).eval()
    enc = model.tokenizer(list(texts), truncation=True, max_length=max_seq_length, return_attention_mask=False)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    collate = Collator(model.tokenizer)
    out = torch.empty(0)
    bar = progress_bar(len(texts), "embedding", unit="texts")
    try:
        for rows in length_sorted_batches([len(ids) for ids in enc["input_ids"]], batch_size):
            batch = collate([{k: enc[k][i] for k in keys} for i in rows])
            with torch.inference_mode():
                z = model(**{k: v.to(device) for k, v in batch.items()}).float().cpu()
            if out.numel() == 0:
                out = torch.empty(len(texts), z.shape[1])
            out[torch.as_tensor(rows)] = z
            bar.update(len(rows))
    finally:
        bar.close()
    return out.numpy()
