"""The sentence-transformers files of a model folder: ``SentenceTransformer(folder)`` returns the SupCon ``z``.

Every model folder (a run's ``best/``, and ``metric-ds export --format st``) holds them. Writing them needs no
sentence-transformers; they use the module names that every sentence-transformers release from 2 to 6 loads::

    modules.json                 transformer -> pooling -> [pooler] -> [projection] -> normalize
    sentence_bert_config.json    max_seq_length from the training config
    1_Pooling/config.json        mean or cls (``pooler`` pools the first token, then the next module)
    2_Pooler/                    model.pooling: pooler only: the encoder's own pooler, Dense + tanh on the first
                                 token, as BERT, RoBERTa and MPNet compute ``pooler_output``; for an encoder
                                 with another pooler the layout is left out with a warning (``metric-ds export
                                 --format st`` refuses it), while the ONNX export has every pooler
    3_Projection/                model.projection_dim only: the SupCon projection head as a Dense (no activation)
    4_Normalize/                 z = unit-norm
    config.json                  + ``id2label`` / ``label2id`` from labels.json (AutoModel still loads it)

The classifier head reads the pooled ``h``: every module before ``projection`` and ``normalize`` (the README's
"Use your model" section shows the few lines); its weights stay in ``heads.safetensors``.

This module knows sentence-transformers' layout only; :func:`metric_ds.artifact.write_sentence_transformers`
reads a model folder's heads and labels and calls :func:`write_layout`.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from metric_ds.errors import UserError

log = logging.getLogger("metric_ds")

# encoders whose pooler_output is tanh(Dense(first token)), under pooler.dense.*
TANH_POOLERS = {"bert", "roberta", "xlm-roberta", "camembert", "mpnet", "ernie", "megatron-bert", "data2vec-text"}
POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented UTF-8 JSON at ``path`` (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _dense(folder: Path, weight: torch.Tensor, bias: torch.Tensor, activation: str) -> None:
    """A sentence-transformers ``Dense`` module folder."""
    out_features, in_features = weight.shape
    write_json(folder / "config.json", {"in_features": in_features, "out_features": out_features, "bias": True,
                                        "activation_function": activation})
    save_file({"linear.weight": weight.contiguous(), "linear.bias": bias.contiguous()},
              str(folder / "model.safetensors"))


def _encoder_tensors(folder: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Those of ``keys`` that the encoder's (possibly sharded) safetensors weights hold."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            found.update({k: fh.get_tensor(k) for k in keys if k in fh.keys()})
    return found


def _pooler(folder: Path, model_type: str | None) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The encoder's pooler as ``(weight, bias)`` of Dense + tanh, or why sentence-transformers cannot have it."""
    if model_type not in TANH_POOLERS:
        return (f"model.pooling is pooler, and sentence-transformers can only reproduce the Dense + tanh pooler of "
                f"{', '.join(sorted(TANH_POOLERS))} encoders, not of model_type {model_type!r}")
    found = _encoder_tensors(folder, POOLER_KEYS)
    if len(found) < len(POOLER_KEYS):
        return f"model.pooling is pooler, but the encoder weights in {folder} have no {' and '.join(POOLER_KEYS)}"
    return found[POOLER_KEYS[0]], found[POOLER_KEYS[1]]


def add_label_names(folder: Path, names: Sequence[Any] | None) -> None:
    """Put ``id2label``/``label2id`` into the encoder's ``config.json`` (nothing when ``names`` is ``None``)."""
    if names is None:
        return
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): str(name) for i, name in enumerate(names)}
    config["label2id"] = {str(name): i for i, name in enumerate(names)}
    write_json(folder / "config.json", config)


def write_layout(folder: str | Path, heads_meta: dict[str, Any], heads: dict[str, torch.Tensor],
                 max_seq_length: int, label_names: Sequence[Any] | None = None, strict: bool = False) -> None:
    """Add the sentence-transformers files (see the module docstring) to a folder that holds the encoder.

    Args:
        folder: holds the encoder's ``config.json`` and safetensors weights.
        heads_meta: :meth:`metric_ds.model.MetricClassifier.heads_meta`.
        heads: the heads' weights (``classifier.*``, ``projection.*``).
        max_seq_length: the truncation length.
        label_names: the classes in id order, for ``id2label``; ``None`` leaves ``config.json`` as it is.
        strict: raise when the layout cannot be written (``pooler`` pooling of an encoder whose pooler is not
            BERT's Dense + tanh); otherwise warn and write only ``id2label``, so that training never fails on it.

    Raises:
        UserError: with ``strict``, when the pooler cannot be reproduced.
    """
    folder = Path(folder)
    add_label_names(folder, label_names)
    config = json.loads((folder / "config.json").read_text())
    pooling = heads_meta["pooling"]
    pooler = _pooler(folder, config.get("model_type")) if pooling == "pooler" else None
    if isinstance(pooler, str):
        if strict:
            raise UserError(f"{pooler}; export with --format onnx, or train with model.pooling mean or cls")
        log.warning(f"{pooler}: {folder} is written without the sentence-transformers files")
        return
    modules = [{"name": "transformer", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"name": "pooling", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": int(heads["classifier.weight"].shape[1]),
        "pooling_mode_cls_token": pooling in ("cls", "pooler"),
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    })
    if pooler is not None:
        _dense(folder / "2_Pooler", *pooler, "torch.nn.modules.activation.Tanh")
        modules.append({"name": "pooler", "path": "2_Pooler", "type": "sentence_transformers.models.Dense"})
    if heads_meta.get("projection_dim"):
        _dense(folder / "3_Projection", heads["projection.weight"], heads["projection.bias"],
               "torch.nn.modules.linear.Identity")
        modules.append({"name": "projection", "path": "3_Projection", "type": "sentence_transformers.models.Dense"})
    (folder / "4_Normalize").mkdir(exist_ok=True)
    modules.append({"name": "normalize", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"})
    write_json(folder / "modules.json", [{"idx": i, **m} for i, m in enumerate(modules)])
