"""The model folder (a run's ``best/``): its files, saving it, finding it, and reading it back.

A model folder is a standard Hugging Face folder plus metric_ds's heads, labels and config::

    config.json, model.safetensors   the encoder (``transformers.AutoModel.from_pretrained(folder)`` loads it
    tokenizer files                  without metric_ds)
    heads.safetensors, heads.json    the classifier and projection weights, and their layout
    labels.json                      the classes in id order (:class:`~metric_ds.data.labels.LabelMap`)
    metric_ds_config.yaml            the training config (``training.max_seq_length`` is read back from it)
    metrics.json                     the validation record the folder was chosen by
    training_data.json               ``{"train": path}``: the training table, the default k-NN bank
    modules.json, ...                the sentence-transformers files (:mod:`metric_ds.st_layout`)

Training writes it with :func:`save_model`; ``metric_ds.load``, ``metric-ds evaluate``, ``export``,
``predict``, ``embed`` and ``pseudo-label --model`` find it with :func:`resolve_model_folder` and read it with
:func:`load_model` and the ``read_*`` functions here.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from metric_ds.config import Config, TrainingConfig, save_config
from metric_ds.data.labels import LabelMap
from metric_ds.errors import UserError
from metric_ds.model import MetricClassifier, load_encoder
from metric_ds.run_folder import BEST
from metric_ds.st_layout import write_layout

HEADS_WEIGHTS = "heads.safetensors"
HEADS_META = "heads.json"
LABELS = "labels.json"
METRICS = "metrics.json"
CONFIG = "metric_ds_config.yaml"
TRAINING_DATA = "training_data.json"
# the truncation length of a folder whose config does not say: the training config's default
DEFAULT_MAX_SEQ_LENGTH: int = TrainingConfig.model_fields["max_seq_length"].default


def resolve_model_folder(path: str | Path) -> Path:
    """The model folder at ``path``: the folder itself, or a run folder's ``best/``.

    Raises:
        UserError: ``path`` is missing, holds no model folder, or its model folder has no ``labels.json``.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder; give a run folder (checkpoints_dir/run_name) or its {BEST}/ "
                        "folder (e.g. runs/example/best)")
    for folder in (path, path / BEST):
        if (folder / HEADS_META).is_file():
            if not (folder / LABELS).is_file():
                raise UserError(f"{folder}: has no {LABELS}, so predictions could not be named; "
                                f"use a folder written by metric-ds train (a run's {BEST}/)")
            return folder
    raise UserError(f"{path} is neither a metric_ds export (it has no {HEADS_META}) nor a run folder with an export "
                    f"(no {BEST}/{HEADS_META}); give RUN_DIR or RUN_DIR/{BEST} of a run that validated at least once")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def save_model(folder: str | Path, model: MetricClassifier, tokenizer: Any, *, label_map: LabelMap,
               state_dict: dict[str, torch.Tensor] | None = None, config: Config | Mapping[str, Any] | None = None,
               metrics: dict[str, Any] | None = None, train_table: str | Path | None = None) -> None:
    """Write a model folder (see the module docstring).

    Args:
        folder: created; the caller makes the write atomic (:func:`metric_ds.run_folder.swap_in_best`).
        model: gives the encoder's config and the heads' layout.
        tokenizer: saved beside the encoder.
        label_map: the classes, written as ``labels.json``.
        state_dict: full weights, keys as in ``model.state_dict()`` (under ZeRO-3 the gathered ones); default:
            ``model.state_dict()``.
        config: the training config (a mapping is written as it is), whose ``training.max_seq_length`` the
            folder's users truncate at; ``None``: no config, so they truncate at :data:`DEFAULT_MAX_SEQ_LENGTH`.
        metrics: the validation record, written as ``metrics.json``.
        train_table: the training table, recorded (as an absolute path) in ``training_data.json``.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    enc_sd = {k[len("encoder."):]: v.detach().cpu().contiguous() for k, v in state_dict.items()
              if k.startswith("encoder.")}
    model.encoder.save_pretrained(out, state_dict=enc_sd, safe_serialization=True)
    tokenizer.save_pretrained(out)
    heads = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not k.startswith("encoder.")}
    save_file(heads, str(out / HEADS_WEIGHTS))
    (out / HEADS_META).write_text(json.dumps(model.heads_meta(), indent=2))
    _write_json(out / LABELS, label_map.to_json())
    if metrics is not None:
        _write_json(out / METRICS, metrics)
    if train_table is not None:
        _write_json(out / TRAINING_DATA, {"train": str(Path(train_table).resolve())})
    if isinstance(config, Config):
        save_config(config, out / CONFIG)
    elif config is not None:
        (out / CONFIG).write_text(yaml.safe_dump(dict(config), sort_keys=False))
    write_layout(out, model.heads_meta(), heads, read_max_seq_length(out), label_map.names)


def write_sentence_transformers(folder: str | Path, *, strict: bool = False) -> None:
    """(Re)write the sentence-transformers files of a model folder, in place, from its heads, labels and config.

    Args:
        folder: a model folder.
        strict: raise when the layout cannot be written (see :func:`metric_ds.st_layout.write_layout`).

    Raises:
        UserError: with ``strict``, when the pooler cannot be reproduced.
    """
    folder = Path(folder)
    write_layout(folder, json.loads((folder / HEADS_META).read_text()), load_file(str(folder / HEADS_WEIGHTS)),
                 read_max_seq_length(folder), read_label_names(folder), strict)


def load_model(folder: str | Path, attn_implementation: str = "sdpa") -> tuple[MetricClassifier, Any]:
    """The model and tokenizer of a model folder (see :func:`resolve_model_folder` for a run folder).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode, on the CPU.

    Raises:
        UserError: the folder has no ``heads.json``, or heads that do not match it.
    """
    folder = Path(folder)
    if not (folder / HEADS_META).is_file():
        raise UserError(f"{folder} is not a metric_ds export: it has no {HEADS_META} (expected a run's {BEST}/ "
                        "folder)")
    meta = json.loads((folder / HEADS_META).read_text())
    encoder, tokenizer = load_encoder(str(folder), attn_implementation)
    model = MetricClassifier(encoder, meta["num_classes"], meta["pooling"], meta["projection_dim"],
                             meta.get("classifier_dropout", 0.0))
    missing, unexpected = model.load_state_dict(load_file(str(folder / HEADS_WEIGHTS)), strict=False)
    if unexpected or any(not k.startswith("encoder.") for k in missing):
        raise UserError(f"{folder / HEADS_WEIGHTS}: heads do not match {HEADS_META}: missing {missing}, "
                        f"unexpected {unexpected}")
    return model.eval(), tokenizer


def read_labels(folder: str | Path) -> LabelMap:
    """The classifier's labels (``labels.json``)."""
    return LabelMap.load(Path(folder) / LABELS)


def read_label_names(folder: str | Path) -> list[Any] | None:
    """The classes in id order, or ``None`` for a folder without ``labels.json``."""
    path = Path(folder) / LABELS
    return read_labels(folder).names if path.is_file() else None


def read_max_seq_length(folder: str | Path) -> int:
    """``training.max_seq_length`` of the folder's ``metric_ds_config.yaml``, else :data:`DEFAULT_MAX_SEQ_LENGTH`."""
    path = Path(folder) / CONFIG
    cfg = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}
    value = (cfg.get("training") or {}).get("max_seq_length")
    return int(value) if value is not None else DEFAULT_MAX_SEQ_LENGTH


def read_training_table(folder: str | Path) -> str | None:
    """The training table recorded in ``training_data.json``, or ``None`` when the folder records none."""
    path = Path(folder) / TRAINING_DATA
    return json.loads(path.read_text())["train"] if path.is_file() else None
