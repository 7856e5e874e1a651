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

    @property
    def encoder_config(self) -> Any:
        """The encoder's Hugging Face config (its position limit, for ``--max-seq-length``)."""
        return self.model.encoder.config if self.kind == "export" else self.model.config

    def __call__(self, input_ids: Any, attention_mask: Any, **extra: Any) -> Any:
        """Unit-norm embeddings, shape (B, dim), float32."""
        import torch.nn.functional as F

        from metric_ds.model import mean_pool

        if self.kind == "export":
            return self.model(input_ids, attention_mask, extra.get("token_type_ids")).z
        states = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return F.normalize(mean_pool(states, attention_mask).float(), dim=-1)


def load_embedder(model: str | Path | None) -> TextEmbedder:
    """The bundled MiniLM (``None``), a metric_ds export (a folder with ``heads.json``, e.g. ``RUN/best``, or the
    run folder that holds it), or any local HF encoder folder (mean pooling)."""
    from metric_ds.artifact import find_model_folder, load_model, resolve_model_folder
    from metric_ds.model import load_encoder

    if model is not None and find_model_folder(model) is not None:
        net, tok = load_model(resolve_model_folder(model))
        return TextEmbedder(net, tok, "export")
    net, tok = load_encoder(None if model is None else str(model))
    return TextEmbedder(net.eval(), tok, "encoder")


def embed_texts(model: TextEmbedder, texts: list[str], batch_size: int, max_seq_length: int,
                device: Any = None) -> np.ndarray:
    """Embed texts with :func:`metric_ds.encode.encode` (length-sorted batches, a progress bar, the GPU when
    there is one for ``device=None``); the output keeps the input order.

    Returns:
        float32 array, shape (N, dim), rows of unit norm.
    """
    import torch

    from metric_ds.encode import encode, pick_device

    device = pick_device(device)
    model.model.to(device).eval()
    out = encode(model, model.tokenizer, texts, max_seq_length, batch_size, device, show_progress=True,
                 desc="embedding")
    return out.get("z", torch.empty(0)).numpy()
