"""The model folder (a run's ``best/``): its files, saving it, finding it, and reading it back.

A model folder is a standard Hugging Face folder plus metric_ds's heads, labels and config::

    config.json, model.safetensors   the encoder (``transformers.AutoModel.from_pretrained(folder)`` loads it
    tokenizer files                  without metric_ds)
    heads.safetensors, heads.json    the classifier and projection weights, and their layout
    labels.json                      the classes in id order (:class:`~metric_ds.data.labels.LabelMap`)
    metric_ds_config.yaml            the training config (``training.max_seq_length`` is read back from it)
    metrics.json                     the validation record the folder was chosen by
    training_data.json               ``{"train": path}``: the training table, the default k-NN bank
    open_set.json, reference.safetensors   the open-set calibration (:mod:`metric_ds.open_set`), after training
    modules.json, ...                the sentence-transformers files (:mod:`metric_ds.st_layout`)

Training writes it with :func:`save_model`; ``metric_ds.load``, ``metric-ds evaluate``, ``export``,
``predict``, ``embed`` and ``pseudo-label --model`` find it with :func:`resolve_model_folder` and read it with
:func:`load_model` and the ``read_*`` functions here. Its metadata is checked once, when a folder is loaded or
exported, before anything is written:
``heads.json`` against :class:`HeadsMeta`, ``labels.json`` against :class:`LabelsFile`, and the tensors that
``heads.safetensors`` holds against both (:func:`check_model_folder`), so that a damaged folder is one error naming
the file and the field, never a traceback or a model that silently computes something else.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from metric_ds.config import Config, TrainingConfig, describe_schema_error, save_config, schema_field
from metric_ds.data.labels import LabelMap
from metric_ds.errors import UserError, read_mapping
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
# what to do about a damaged folder, ending each message about one
DAMAGED = "the model folder is damaged: copy it again from where it was made (a run's best/), or train again"
# the pooling choices are the training config's (model.pooling): one home
Pooling = schema_field("model.pooling").annotation


class HeadsMeta(BaseModel):
    """``heads.json``: the heads' constructor arguments (:meth:`metric_ds.model.MetricClassifier.heads_meta`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    pooling: Pooling
    num_classes: int = Field(ge=1)
    projection_dim: int | None = Field(gt=0)
    classifier_dropout: float = Field(0.0, ge=0, lt=1)  # absent from the oldest folders; no effect in eval mode


class LabelsFile(BaseModel):
    """``labels.json``: the classes in id order, all of one type: the one that ``type`` names
    (:meth:`metric_ds.data.labels.LabelMap.to_json`), or the first name's where it names none."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["int", "str"] | None = None
    names: list[int | str] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_type_distinct(self) -> LabelsFile:
        kind = self.type or type(self.names[0]).__name__
        wrong = [n for n in self.names if type(n).__name__ != kind]
        if wrong:
            raise ValueError(f"names: {', '.join(map(repr, wrong[:3]))} are not of type {kind}")
        seen: set[Any] = set()
        repeated = sorted({repr(n) for n in self.names if n in seen or seen.add(n)})
        if repeated:
            raise ValueError(f"names: must be distinct, but {', '.join(repeated[:5])} appear more than once")
        return self


def read_schema_file(path: Path, schema: type[BaseModel]) -> Any:
    """The file at ``path`` validated by ``schema``, or one :class:`UserError` naming the file and every bad field."""
    data = read_mapping(path, "file of the model folder", "JSON", json.loads, json.JSONDecodeError, DAMAGED)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            if err["type"] == "extra_forbidden":
                key, message = str(err["loc"][-1]), f"unknown key; known: {', '.join(schema.model_fields)}"
            else:
                key, message = describe_schema_error(err)
            problems.append(f"{key}: {message}")
        raise UserError(f"{path}: {'; '.join(problems)}; {DAMAGED}") from None


def find_model_folder(path: str | Path) -> Path | None:
    """``path`` itself or its ``best/``, whichever holds ``heads.json``; None when neither does."""
    return next((f for f in (Path(path), Path(path) / BEST) if (f / HEADS_META).is_file()), None)


def resolve_model_folder(path: str | Path) -> Path:
    """The model folder at ``path``: the folder itself, or a run folder's ``best/`` (found, not read: its
    metadata is checked by whatever loads it, :func:`load_model` or :func:`check_model_folder`).

    Raises:
        UserError: ``path`` is missing, holds no model folder, or its model folder has no ``labels.json``.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder; give a run folder (checkpoints_dir/run_name) or its {BEST}/ "
                        "folder (e.g. runs/example/best)")
    folder = find_model_folder(path)
    if folder is not None:
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
        UserError: a damaged folder (:func:`check_model_folder`); with ``strict``, a pooler that cannot be
            reproduced.
    """
    folder = Path(folder)
    meta, labels = check_model_folder(folder)
    write_layout(folder, meta.model_dump(), load_file(str(folder / HEADS_WEIGHTS)), read_max_seq_length(folder),
                 None if labels is None else labels.names, strict)


# ---------------------------------------------------------------------------------------------- reading


def read_heads_meta(folder: str | Path) -> HeadsMeta:
    """``heads.json``, validated.

    Raises:
        UserError: the file is not JSON, not a mapping, or a field is missing, unknown or bad; naming each.
    """
    return read_schema_file(Path(folder) / HEADS_META, HeadsMeta)


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of each tensor of a safetensors file, from its header (no weights are read).

    Raises:
        UserError: the file is unreadable, truncated or not a safetensors file.
    """
    try:
        with safe_open(str(path), "pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118 - no iter
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: unreadable, truncated or not a safetensors file ({exc}); {DAMAGED}") from None


def _heads_problems(folder: Path, meta: HeadsMeta, labels: LabelMap | None,
                    shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """How ``heads.json``, ``labels.json`` and the tensors of ``heads.safetensors`` disagree (empty: they agree)."""
    problems = []
    classes = shapes.get("classifier.weight", (None,))[0]
    if meta.num_classes != classes or (labels is not None and labels.num_classes != meta.num_classes):
        named = f"{LABELS} names {labels.num_classes} classes and " if labels is not None else ""
        held = f"a classifier for {classes}" if classes is not None else "no classifier"
        problems.append(f"{folder / HEADS_META}: num_classes is {meta.num_classes}, but {named}{HEADS_WEIGHTS} "
                        f"holds {held}")
    projection = shapes.get("projection.weight", (None,))[0]
    if meta.projection_dim != projection:
        held = f"a projection to {projection}" if projection is not None else "no projection"
        problems.append(f"{folder / HEADS_META}: projection_dim is {json.dumps(meta.projection_dim)}, but "
                        f"{HEADS_WEIGHTS} holds {held}")
    expected = {f"{head}.{part}" for head in ("classifier", "projection") for part in ("weight", "bias")
                if head == "classifier" or meta.projection_dim is not None}
    if not problems and set(shapes) != expected:
        problems.append(f"{folder / HEADS_WEIGHTS}: holds tensors {', '.join(sorted(shapes))}; {HEADS_META} asks "
                        f"for {', '.join(sorted(expected))}")
    return problems


def check_model_folder(folder: str | Path) -> tuple[HeadsMeta, LabelMap | None]:
    """Check a model folder's metadata without loading its weights: ``heads.json`` and ``labels.json`` (when there
    is one) against their schemas, the tensors of ``heads.safetensors`` against both, and that every safetensors
    file is whole (its header covers the file).

    Returns:
        ``(heads.json, labels.json or None)``.

    Raises:
        UserError: one message naming the damaged file, the field and what it should be.
    """
    folder = Path(folder)
    meta = read_heads_meta(folder)
    labels = read_labels(folder) if (folder / LABELS).is_file() else None
    problems = _heads_problems(folder, meta, labels, _tensor_shapes(folder / HEADS_WEIGHTS))
    for encoder_weights in sorted(folder.glob("model*.safetensors")):  # one file, or the shards of a large one
        _tensor_shapes(encoder_weights)
    if problems:
        raise UserError(f"{'; '.join(problems)}; {DAMAGED}")
    return meta, labels


def load_model(folder: str | Path, attn_implementation: str = "sdpa") -> tuple[MetricClassifier, Any]:
    """The model and tokenizer of a model folder (see :func:`resolve_model_folder` for a run folder).

    Returns:
        ``(model, tokenizer)`` with the model in fp32, in eval mode, on the CPU.

    Raises:
        UserError: the folder has no ``heads.json``, or is damaged (:func:`check_model_folder`), or its heads
            do not fit its encoder (vectors of another width).
    """
    folder = Path(folder)
    if not (folder / HEADS_META).is_file():
        raise UserError(f"{folder} is not a metric_ds export: it has no {HEADS_META} (expected a run's {BEST}/ "
                        "folder)")
    meta, _ = check_model_folder(folder)
    heads = load_file(str(folder / HEADS_WEIGHTS))
    encoder, tokenizer = load_encoder(str(folder), attn_implementation)
    model = MetricClassifier(encoder, meta.num_classes, meta.pooling, meta.projection_dim, meta.classifier_dropout)
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    held = {k: tuple(v.shape) for k, v in heads.items()}
    if held != wanted:
        diff = [f"{k} holds {held.get(k, 'nothing')} where {wanted.get(k, 'nothing')} is needed"
                for k in sorted(set(held) | set(wanted)) if held.get(k) != wanted.get(k)]
        raise UserError(f"{folder / HEADS_WEIGHTS}: {'; '.join(diff)} (by {HEADS_META} and the encoder's "
                        f"config.json, hidden_size {encoder.config.hidden_size}); {DAMAGED}")
    model.load_state_dict(heads, strict=False)  # the encoder's weights are loaded already
    # fp32 throughout: a bf16 run's folder holds a bf16 encoder (which from_pretrained keeps) beside fp32 heads
    return model.float().eval(), tokenizer


def read_labels(folder: str | Path) -> LabelMap:
    """The classifier's labels (``labels.json``), validated.

    Raises:
        UserError: the file is not JSON, or its names are missing, of another type than it says, or repeated.
    """
    return LabelMap(read_schema_file(Path(folder) / LABELS, LabelsFile).names)


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
