"""The config schema: every key, its type, default and constraints, validated in one place.

A run is described by one YAML file (see ``configs/metric_classifier_training.example.yaml``, which documents
every key). :func:`load_config` reads it, applies ``--set key.path=value`` overrides and validates it. Every
problem is reported at once, each with its full key path, e.g.
``training.supcon_temperature: must be > 0, got -0.1``; unknown keys get a "did you mean" suggestion.
"""
from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from metric_ds.ds_config import OWNED_KEYS
from metric_ds.errors import UserError, read_mapping


def _is_number_type(annotation: Any) -> bool:
    """int or float (optionally with None), where a YAML ``true``/``yes`` must not pass for 1."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    args = tuple(a for a in args if a is not type(None))
    return bool(args) and all(a in (int, float) for a in args)


def _is_text_type(annotation: Any) -> bool:
    """str, or a Literal of strings (optionally with None): a ``--set`` value for it is taken as typed."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    args = tuple(a for a in args if a is not type(None))
    return bool(args) and all(a is str or (get_origin(a) is Literal and all(isinstance(v, str) for v in get_args(a)))
                              for a in args)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and _is_number_type(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


class ModelConfig(_Section):
    """The encoder's heads."""

    pooling: Literal["mean", "cls", "pooler"] = Field("mean", description="How token states become a sentence vector h.")
    projection_dim: int | None = Field(None, gt=0, description="Optional SupCon projection head Linear(h) -> dim.")
    classifier_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the classifier Linear(h).")


class DataConfig(_Section):
    """Where the data is and how it is split, balanced and batched."""

    parquet_path: str = Field(..., description="Training table: .parquet, .csv or .jsonl.")
    val_parquet_path: str | None = Field(None, description="Explicit validation table; replaces val_ratio.")
    val_ratio: float = Field(0.1, gt=0, lt=1, description="Stratified share of the table kept for validation.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    upsample: int | None = Field(None, gt=0, description="Sample train classes with replacement up to N rows.")
    downsample: int | None = Field(None, gt=0, description="Sample train classes without replacement down to N.")
    sampler: Literal["random", "pk"] = Field("random", description="random batches, or P classes x K samples.")
    classes_per_batch: int | None = Field(None, gt=0, description="pk sampler: classes per batch (P).")
    samples_per_class: int | None = Field(None, ge=2, description="pk sampler: rows per class (K >= 2).")

    @model_validator(mode="after")
    def _check_pk(self) -> DataConfig:
        if self.sampler == "pk" and (self.classes_per_batch is None or self.samples_per_class is None):
            raise ValueError("sampler 'pk' needs data.classes_per_batch and data.samples_per_class")
        if self.upsample is not None and self.downsample is not None and self.upsample > self.downsample:
            raise ValueError(f"upsample ({self.upsample}) must be <= downsample ({self.downsample})")
        return self


class TrainingConfig(_Section):
    """The optimisation loop and the joint loss."""

    batch_size: int = Field(32, gt=0, description="Micro-batch size per process.")
    num_epochs: int = Field(3, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_seq_length: int = Field(128, gt=1, description="Truncation length; batches are padded dynamically.")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    attention_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    gradient_clip_val: float = Field(1.0, ge=0, description="Global grad-norm clip; 0 disables.")
    seed: int = 42
    resume_from: str | None = Field(None, description="A checkpoint folder, a run folder, or 'latest'.")
    supcon_temperature: float = Field(0.07, gt=0)
    classification_loss_weight: float = Field(1.0, ge=0)
    metric_loss_weight: float = Field(1.0, ge=0)
    supcon_impl: Literal["auto", "fused", "reference"] = "auto"
    supcon_scope: Literal["global", "local"] = Field("global", description="SupCon negatives from all ranks or own.")
    contrastive_batch: Literal["micro", "accumulated"] = Field(
        "micro", description="The SupCon (and CE) batch: each (global) micro-batch on its own, or every row of the "
                             "gradient_accumulation_steps micro-batches of an optimizer step (gradient caching: a "
                             "second forward per micro-batch, the memory of one).")
    max_steps: int | None = Field(None, gt=0, description="Cap on optimizer steps (smoke runs).")
    log_every_n_steps: int = Field(10, gt=0)
    eval_every_n_steps: int | None = Field(None, gt=0, description="Also validate every N steps (always at epoch end).")

    @model_validator(mode="after")
    def _check_weights(self) -> TrainingConfig:
        if self.classification_loss_weight == 0 and self.metric_loss_weight == 0:
            raise ValueError("classification_loss_weight and metric_loss_weight are both 0: nothing to train")
        return self


class OptimizerConfig(_Section):
    """AdamW."""

    learning_rate: float = Field(5e-5, gt=0)
    head_learning_rate: float | None = Field(
        None, gt=0, description="Peak lr of the new heads (classifier, projection); null: learning_rate."
    )
    weight_decay: float = Field(0.01, ge=0)


class SchedulerConfig(_Section):
    """A ``transformers.get_scheduler`` schedule."""

    name: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "linear"
    warmup_steps: int = Field(0, ge=0)
    num_training_steps: int | None = Field(None, gt=0, description="null: computed from data, epochs, max_steps.")
    num_cycles: float = Field(0.5, gt=0, description="cosine: half-waves; cosine_with_restarts: restarts.")


class CheckpointingConfig(_Section):
    """Where runs go and what is kept."""

    checkpoints_dir: str = "runs"
    save_every_n_batches: int | None = Field(
        None, gt=0, description="Periodic checkpoint every N optimizer steps (not micro-batches: the name is kept "
                                "for existing configs).")
    keep_last_n_checkpoints: int = Field(2, gt=0)
    overwrite: bool = Field(False, description="Delete a run already in the run folder and start afresh "
                                               "(otherwise a non-empty run folder is refused unless resumed).")
    save_best_by: Literal["loss", "acc", "f1", "knn_acc", "knn_f1"] = Field(
        "f1", description="The validation metric that picks best/: knn_* (k-NN against the bank) for metric-only runs."
    )

    @model_validator(mode="before")
    @classmethod
    def _old_spelling(cls, data: Any) -> Any:
        if isinstance(data, dict) and "save_every_n_bathces" in data:
            data = dict(data)
            value = data.pop("save_every_n_bathces")
            if "save_every_n_batches" in data:
                raise ValueError("give save_every_n_batches only (save_every_n_bathces is its old spelling)")
            warnings.warn(
                "checkpointing.save_every_n_bathces is deprecated: rename it to save_every_n_batches",
                FutureWarning,
                stacklevel=2,
            )
            data["save_every_n_batches"] = value
        return data


class MetricValidationConfig(_Section):
    """Retrieval metrics against the bank of recent train embeddings."""

    recall_at_k: list[int] = Field(default_factory=lambda: [1, 5, 10])
    distance: Literal["cos", "l2"] = "cos"
    knn_k: int = Field(10, gt=0)
    keep_last_n_emb_steps: int = Field(50, ge=0, description="Bank holds metric rows of the last N optimizer steps.")
    eval_batch_size: int | None = Field(
        None, gt=0, description="Rows per validation forward (no gradients, so larger); null: 4 x training.batch_size."
    )

    @field_validator("recall_at_k")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if not ks or any(k <= 0 for k in ks):
            raise ValueError(f"must be a non-empty list of positive integers, got {ks}")
        return sorted(set(ks))


class NeptuneConfig(_Section):
    """Neptune tracking. The API token comes only from the NEPTUNE_API_TOKEN environment variable."""

    enabled: bool = False
    project: str | None = None
    mode: Literal["async", "offline", "debug"] = "offline"
    name: str | None = None
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(_Section):
    """Where metrics go (only rank 0 logs)."""

    backends: list[Literal["jsonl", "console", "tensorboard", "neptune"]] = Field(
        default_factory=lambda: ["jsonl", "console"]
    )
    progress: Literal["auto", "bar", "plain", "off"] = Field(
        "auto", description="Progress bar; auto: a bar on a terminal, plain lines in a file. Env METRIC_DS_PROGRESS wins."
    )


class DeepSpeedConfig(_Section):
    """DeepSpeed engine settings; ``config`` passes raw DeepSpeed keys through."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    config: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed keys not covered above.")

    @field_validator("config")
    @classmethod
    def _no_conflicts(cls, raw: dict[str, Any]) -> dict[str, Any]:
        clashes = []
        for key, ours in OWNED_KEYS.items():
            head, _, tail = key.partition(".")
            if head in raw and (not tail or (isinstance(raw[head], dict) and tail in raw[head])):
                clashes.append(f"'{key}' is set by {ours}")
        if clashes:
            raise ValueError("conflicts with our own keys: " + "; ".join(clashes) + ". Remove them from deepspeed.config")
        return raw


class Config(_Section):
    """A whole run."""

    run_name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$", description="Run folder name under checkpoints_dir.")

    @field_validator("run_name")
    @classmethod
    def _inside_checkpoints_dir(cls, name: str) -> str:
        if set(name) == {"."}:
            raise ValueError(f"{name!r} would put the run outside checkpoints_dir; give a plain folder name")
        return name

    model_name: str | None = Field(None, description="HF model folder or hub name; null is the bundled MiniLM.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    metric_validation: MetricValidationConfig = Field(default_factory=MetricValidationConfig)
    neptune: NeptuneConfig = Field(default_factory=NeptuneConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)

    @property
    def run_dir(self) -> Path:
        """``checkpoints_dir/run_name``."""
        return Path(self.checkpointing.checkpoints_dir) / self.run_name

    @model_validator(mode="after")
    def _check_resume_or_overwrite(self) -> Config:
        if self.training.resume_from and self.checkpointing.overwrite:
            raise ValueError("training.resume_from and checkpointing.overwrite contradict each other: resume the "
                             "run, or overwrite it, not both")
        return self

    @model_validator(mode="after")
    def _check_best_metric(self) -> Config:
        key = self.checkpointing.save_best_by
        if key.startswith("knn_") and self.metric_validation.keep_last_n_emb_steps == 0:
            raise ValueError(f"checkpointing.save_best_by: {key!r} is computed against the embedding bank, which "
                             "metric_validation.keep_last_n_emb_steps = 0 turns off; raise it or pick loss/acc/f1")
        if key in ("acc", "f1") and self.training.classification_loss_weight == 0:
            raise ValueError(f"checkpointing.save_best_by: {key!r} scores a classifier that "
                             "training.classification_loss_weight = 0 never trains; pick knn_f1, knn_acc or loss")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------- errors


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at ``loc`` (a path into the schema), for "did you mean" suggestions."""
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    """Turn one pydantic error into (key path, message)."""
    loc = tuple(p for p in err["loc"] if p not in ("function-after",))
    path = ".".join(str(p) for p in loc) or "<root>"
    ctx = err.get("ctx") or {}
    got = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(Config, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; known keys: {', '.join(known)}" if known else "")
        return path, f"unknown key{hint}"
    if kind == "missing":
        return path, "is required"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return path, f"must be {bounds[kind]} {limit}, got {got!r}"
    if kind == "literal_error":
        return path, f"must be one of {ctx.get('expected')}, got {got!r}"
    if kind == "value_error":
        message = str(ctx.get("error", err["msg"]))
        if not loc and ": " in message:  # a check across sections names its own key path
            path, _, message = message.partition(": ")
        return path, message
    if kind == "string_pattern_mismatch":
        return path, f"must match {ctx.get('pattern')} (letters, digits, '.', '_', '-'), got {got!r}"
    return path, f"{err['msg'][0].lower()}{err['msg'][1:]}, got {got!r}"


def _format_errors(exc: ValidationError, source: str) -> UserError:
    messages = []
    for err in exc.errors():
        path, message = _describe(err)
        messages.append(f"{source}: {path}: {message}")
    return UserError(messages)


# ---------------------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``key.path=value``; the value is read as YAML (``3``, ``0.1``, ``null``, ``[1, 5]``, ``text``)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key.path=value, e.g. --set training.batch_size=16")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {item!r}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _annotation_at(parts: list[str]) -> Any:
    """The schema's type of the key at ``parts``, or None for a key the schema does not know."""
    model: Any = Config
    annotation = None
    for part in parts:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation
    return annotation


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to raw config data (before validation, so they are validated too).

    A value is read as YAML, except for text keys (``run_name``, paths, choices), which take the text as typed:
    ``--set run_name=2024`` is the name "2024", and ``--set training.mixed_precision=no`` is "no", not false.
    """
    for item in overrides:
        parts, value = parse_override(item)
        if _is_text_type(_annotation_at(parts)):
            raw = item.partition("=")[2].strip()
            value = raw if raw not in ("", "null", "~") else None
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"--set {item!r}: {part} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    return read_mapping(Path(path), "config file", "YAML", yaml.safe_load, yaml.YAMLError,
                        "check the path given to --config and its contents")


def validate_config(data: dict[str, Any], source: str = "config") -> Config:
    """Validate raw config data, reporting every problem at once with its key path."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FutureWarning)
            cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise _format_errors(exc, source) from None
    for w in caught:
        warnings.warn(f"{source}: {w.message}", w.category, stacklevel=2)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a YAML config.

    Relative data paths stay relative to the working directory (as users type them on the command line).

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings from ``--set``.

    Raises:
        UserError: listing every problem, each with its key path.
    """
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate_config(data, source=str(path))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def schema_field(key: str) -> FieldInfo:
    """The schema's field at a dotted key path, e.g. ``schema_field("metric_validation.knn_k")``: its type,
    default (``.get_default(call_default_factory=True)``) and constraints, for the command line to read instead of
    restating them."""
    model: Any = Config
    *sections, name = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name]
