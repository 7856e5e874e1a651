"""The config schema: every key, its type, default and constraints, validated in one place.

A run is described by one YAML file. Every field carries its description; :mod:`metric_ds.config_docs` renders
them into ``docs/configuration.md`` and ``configs/metric_classifier_training.example.yaml`` (every key with its
default). :func:`load_config` reads it, applies ``--set key.path=value`` overrides and validates it. Every
problem is reported at once, each with its full key path, e.g.
``training.supcon_temperature: must be > 0, got -0.1``; unknown keys get a "did you mean" suggestion.
"""
from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from metric_ds.errors import UserError, read_mapping


# Keys renamed since they shipped: old dotted name -> new one. The old name is still accepted, with a
# FutureWarning (a config that gives both names is an error); ``--set`` takes either name, and the resume check
# reads a checkpoint's saved config through this table, so a run saved before a rename still resumes.
RENAMED_KEYS: dict[str, str] = {
    "checkpointing.save_every_n_bathces": "checkpointing.save_every_n_batches",
    "data.parquet_path": "data.train_path",
    "data.val_parquet_path": "data.val_path",
    "metric_validation.keep_last_n_emb_steps": "metric_validation.train_bank_steps",
}


def current_key(path: str) -> str:
    """The current name of the dotted key ``path``: itself, unless it is an old name in :data:`RENAMED_KEYS`."""
    return RENAMED_KEYS.get(path, path)


def _is_number_type(annotation: Any) -> bool:
    """int or float, or a Literal of ints (optionally with None), where a YAML ``true``/``yes`` must not pass
    for 1."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    args = tuple(a for a in args if a is not type(None))
    return bool(args) and all(a in (int, float) or (get_origin(a) is Literal and all(
        isinstance(v, int) and not isinstance(v, bool) for v in get_args(a))) for a in args)


# YAML 1.1 (PyYAML's safe_load) reads an unquoted yes/no/on/off (any case) as a boolean: the words that a key
# whose choices include them gets back, so that ``progress: off`` means "off" as ``--set logging.progress=off`` does.
_BOOL_WORDS: dict[bool, tuple[str, ...]] = {False: ("off", "no"), True: ("on", "yes")}


def _choices(annotation: Any) -> tuple[str, ...]:
    """The text choices of a Literal (optionally with None); () for any other type."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return tuple(v for a in args if get_origin(a) is Literal for v in get_args(a) if isinstance(v, str))


def _bool_as_word(value: bool, annotation: Any) -> str:
    """The choice that YAML turned into ``value`` (``off``/``no`` for False, ``on``/``yes`` for True).

    Raises:
        ValueError: for a text key (free text, or choices none of which is such a word), saying to quote the word.
    """
    choices = _choices(annotation)
    word = next((w for w in _BOOL_WORDS[value] if w in choices), None)
    if word is None:
        expected = f"must be one of {', '.join(map(repr, choices))}" if choices else "expected text"
        raise ValueError(f"{expected}, got {str(value).lower()} (YAML reads an unquoted yes, no, on, off, true or "
                         "false as a boolean: quote the word)")
    return word


def _is_text_type(annotation: Any) -> bool:
    """str, or a Literal of strings (optionally with None): a ``--set`` value for it is taken as typed."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    args = tuple(a for a in args if a is not type(None))
    return bool(args) and all(a is str or (get_origin(a) is Literal and all(isinstance(v, str) for v in get_args(a)))
                              for a in args)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    section: ClassVar[str] = ""  # this section's key in the config ("" for the top level)

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        """Accept a key of :data:`RENAMED_KEYS` under its old name, with a FutureWarning."""
        if not isinstance(data, dict):
            return data
        for old_path, new_path in RENAMED_KEYS.items():
            section, _, old = old_path.rpartition(".")
            if section != cls.section or old not in data:
                continue
            new = new_path.rpartition(".")[2]
            data = dict(data)
            value = data.pop(old)
            if new in data:
                raise ValueError(f"give {new} only ({old} is its old name)")
            warnings.warn(f"{old_path} is deprecated: rename it to {new}", FutureWarning, stacklevel=2)
            data[new] = value
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_bools(cls, value: Any, info: ValidationInfo) -> Any:
        """A boolean is no number and no text; for a key whose choices include off/no (on/yes), it is that word."""
        if not isinstance(value, bool):
            return value
        annotation = cls.model_fields[info.field_name].annotation
        if _is_number_type(annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return _bool_as_word(value, annotation) if _is_text_type(annotation) else value


class ModelConfig(_Section):
    """The encoder's heads."""

    section: ClassVar[str] = "model"

    pooling: Literal["mean", "cls", "pooler"] = Field(
        "mean", description="How token states become the sentence vector h: the mean over tokens, the first token's "
                            "state, or the model's pooler output.")
    projection_dim: int | None = Field(
        None, gt=0, description="Size of the SupCon projection head: SupCon uses normalize(Linear(h)) of this size; "
                                "null: normalize(h).")
    classifier_dropout: float = Field(0.1, ge=0, lt=1,
                                      description="Dropout on h before the classifier Linear(h) -> C logits.")


class DataConfig(_Section):
    """Where the data is and how it is split, balanced and batched."""

    section: ClassVar[str] = "data"

    train_path: str = Field(
        ..., examples=["data/train.parquet"],
        description="Training table (.parquet, .csv or .jsonl) in metric_ds format: columns text, label, metric_mask, "
                    "classifier_mask (make one with `metric-ds prepare`).")
    val_path: str | None = Field(
        None, description="Explicit validation table, in the same format; when set, val_ratio is not used.")
    val_ratio: float = Field(0.1, gt=0, lt=1,
                             description="Stratified share of the training table held out for validation.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    upsample: int | None = Field(
        None, gt=0, description="Train classes with fewer than N rows are sampled with replacement up to N; "
                                "null: off.")
    downsample: int | None = Field(
        None, gt=0, description="Train classes with more than N rows are sampled without replacement down to N; "
                                "null: off.")
    sampler: Literal["random", "pk"] = Field(
        "random", description="random batches, or pk: P classes x K samples per batch, so that every SupCon anchor "
                              "has positives.")
    classes_per_batch: int | None = Field(None, gt=0, description="pk sampler: classes per batch (P).")
    samples_per_class: int | None = Field(None, ge=2, description="pk sampler: rows per class (K).")

    @model_validator(mode="after")
    def _check_pk(self) -> DataConfig:
        if self.sampler == "pk" and (self.classes_per_batch is None or self.samples_per_class is None):
            raise ValueError("sampler 'pk' needs data.classes_per_batch and data.samples_per_class")
        if self.upsample is not None and self.downsample is not None and self.upsample > self.downsample:
            raise ValueError(f"upsample ({self.upsample}) must be <= downsample ({self.downsample})")
        return self


class TrainingConfig(_Section):
    """The optimisation loop and the joint loss."""

    section: ClassVar[str] = "training"

    batch_size: int = Field(32, gt=0, description="Micro-batch size per process.")
    num_epochs: int = Field(3, gt=0, description="Passes over the training split.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step (contrastive_batch says which rows SupCon compares).")
    max_seq_length: int = Field(
        128, gt=1, description="Truncation length in tokens; batches are padded dynamically to their longest text.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Activation precision: no is fp32; fp16 needs a CUDA GPU.")
    allow_tf32: bool = Field(
        False, description="Let fp32 matmuls on CUDA (the encoder's and the fused SupCon op's) use TF32 tensor cores: "
                           "faster on Ampere and later GPUs, about 3 significant digits instead of 7. false keeps the "
                           "op's matmuls in IEEE fp32 even where the process turned TF32 on; the op's self-check "
                           "always runs without TF32.")
    attention_implementation: Literal["eager", "sdpa", "flash_attention_2"] = Field(
        "sdpa", description="The encoder's attention; flash_attention_2 needs a CUDA GPU, the flash-attn package "
                            "and fp16 or bf16.")
    gradient_clip_val: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 disables it.")
    seed: int = Field(42, description="Seed of the run's randomness: the split, the balancing draw, the batch order "
                                      "and the new heads' initial weights.")
    resume_from: str | None = Field(
        None, description="Resume a run: latest, a run folder, or a checkpoints/step-N folder; null: start afresh.")
    supcon_temperature: float = Field(0.07, gt=0, description="SupCon temperature tau.")
    classification_loss_weight: float = Field(
        1.0, ge=0, description="Weight of the cross-entropy term (rows with classifier_mask = 1).")
    metric_loss_weight: float = Field(1.0, ge=0,
                                      description="Weight of the SupCon term (rows with metric_mask = 1).")
    label_free_weight: float = Field(
        1.0, ge=0, description="Weight of a label-free row's SupCon anchor (null label, metric_mask 1, classifier_mask "
                               "0; its positive is a second view of itself) relative to a labelled anchor, inside "
                               "the one SupCon mean; to be chosen on validation. Unused without label-free rows.")
    supcon_impl: Literal["auto", "fused", "reference"] = Field(
        "auto", description="auto: the fused op when it is built, else the reference with a warning; fused: the op "
                            "or an error saying why not; reference: plain PyTorch.")
    supcon_scope: Literal["global", "local"] = Field(
        "global", description="global: SupCon negatives from every rank (the gradients of a single process); "
                              "local: each rank's own rows only.")
    contrastive_batch: Literal["micro", "accumulated"] = Field(
        "micro", description="The SupCon (and CE) batch: each (globally gathered) micro-batch on its own, or every "
                             "row of the gradient_accumulation_steps micro-batches of an optimizer step (gradient "
                             "caching: a second forward per micro-batch, the activations of one in memory).")
    max_steps: int | None = Field(None, gt=0, description="Cap on optimizer steps (smoke runs); null: no cap.")
    log_every_n_steps: int = Field(10, gt=0, description="A log record every N optimizer steps.")
    eval_every_n_steps: int | None = Field(
        None, gt=0, description="Also validate every N optimizer steps; validation always runs at each epoch end.")

    @model_validator(mode="after")
    def _check_weights(self) -> TrainingConfig:
        if self.classification_loss_weight == 0 and self.metric_loss_weight == 0:
            raise ValueError("classification_loss_weight and metric_loss_weight are both 0: nothing to train")
        return self


class OptimizerConfig(_Section):
    """AdamW (no weight decay on biases and LayerNorm weights)."""

    section: ClassVar[str] = "optimizer"

    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of the encoder.")
    head_learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate of the new, randomly initialised heads (classifier, projection); "
                                "null: learning_rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")


class SchedulerConfig(_Section):
    """The learning-rate schedule, a ``transformers.get_scheduler`` schedule."""

    section: ClassVar[str] = "scheduler"

    name: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = Field("linear", description="The schedule's shape (transformers.get_scheduler's name).")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warm-up.")
    num_training_steps: int | None = Field(
        None, gt=0, description="The schedule's length in optimizer steps; null: computed from the data, "
                                "training.num_epochs and training.max_steps.")
    num_cycles: float = Field(
        0.5, gt=0, description="cosine: number of half-waves; cosine_with_restarts: number of restarts.")


class CheckpointingConfig(_Section):
    """Where runs go and what is kept."""

    section: ClassVar[str] = "checkpointing"

    checkpoints_dir: str = Field("runs", description="Runs go to checkpoints_dir/run_name.")
    save_every_n_batches: int | None = Field(
        None, gt=0, description="A periodic resumable checkpoint every N optimizer steps (not micro-batches: the "
                                "name is kept for existing configs); null: none.")
    keep_last_n_checkpoints: int = Field(2, gt=0, description="Periodic checkpoints kept; older ones are deleted.")
    overwrite: bool = Field(False, description="Delete a run already in the run folder and start afresh "
                                               "(otherwise a non-empty run folder is refused unless resumed); "
                                               "also `metric-ds train --overwrite`.")
    save_best_by: Literal["loss", "acc", "f1", "knn_acc", "knn_f1"] = Field(
        "f1", description="The validation metric that picks best/, the exported model: loss (lower is better), acc, "
                          "f1, or knn_acc / knn_f1 (k-NN against the bank) for metric-only runs.")


class MetricValidationConfig(_Section):
    """Retrieval metrics: validation metric rows queried against a bank of recent train embeddings."""

    section: ClassVar[str] = "metric_validation"

    recall_at_k: list[int] = Field(default_factory=lambda: [1, 5, 10],
                                   description="The k of each Recall@k reported (val/recall@k).")
    distance: Literal["cos", "l2"] = Field(
        "cos", description="cos: on the normalised SupCon embedding z; l2: on the raw pooled embedding h.")
    knn_k: int = Field(10, gt=0, description="k-NN vote size for val/knn_acc and val/knn_f1.")
    train_bank_steps: int = Field(
        50, ge=0, description="The bank of recent TRAIN embeddings holds the metric rows of the last N optimizer "
                              "steps; 0 turns it off, and the retrieval metrics with it.")
    eval_batch_size: int | None = Field(
        None, gt=0, description="Rows per validation forward (no gradients, length-sorted, so it can be larger); "
                                "null: 4 x training.batch_size.")

    @field_validator("recall_at_k")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if not ks or any(k <= 0 for k in ks):
            raise ValueError(f"must be a non-empty list of positive integers, got {ks}")
        return sorted(set(ks))


class OpenSetConfig(_Section):
    """Rejecting out-of-scope texts: at the end of training, each in-scope score (msp, knn, centroid) gets a
    threshold chosen on the validation rows, which are all of known classes (docs/using-a-model.md)."""

    section: ClassVar[str] = "open_set"

    calibrate: bool = Field(True, description="Calibrate best/ at the end of training (open_set.json and "
                                              "reference.safetensors); also metric-ds calibrate, for any model.")
    score: Literal["msp", "knn", "centroid"] = Field(
        "knn", description="The default score of predict --reject: msp (maximum softmax probability), knn (mean "
                           "cosine similarity to the knn_k nearest training rows) or centroid (cosine similarity to "
                           "the nearest class centroid).")
    reject_rate: float = Field(0.05, gt=0, lt=1, description="Each threshold rejects at most this share of the "
                                                             "known-class validation rows.")
    knn_k: int = Field(10, gt=0, description="Neighbours averaged by the knn score.")
    unknown_label: str | int = Field("unknown", description="What predict --reject answers for a rejected text; "
                                                             "must not be one of the model's labels.")
    max_reference_rows: int = Field(
        20_000, gt=0, description="The knn score searches at most this many labelled training rows (a seeded draw "
                                  "beyond it), stored in fp16 in reference.safetensors.")


class NeptuneConfig(_Section):
    """Neptune tracking. The API token comes only from the NEPTUNE_API_TOKEN environment variable."""

    section: ClassVar[str] = "neptune"

    enabled: bool = Field(False, description="Log to Neptune, as if logging.backends named neptune.")
    project: str | None = Field(None, description="workspace/project on your (self-hosted) Neptune server.")
    mode: Literal["async", "offline", "debug"] = Field(
        "offline", description="async: a server; offline: stored locally, `neptune sync` later; debug: nothing "
                               "stored.")
    name: str | None = Field(None, description="The run's display name.")
    tags: list[str] = Field(default_factory=list, description="The run's tags.")


class LoggingConfig(_Section):
    """Where metrics go (only rank 0 logs)."""

    section: ClassVar[str] = "logging"

    backends: list[Literal["jsonl", "console", "tensorboard", "neptune"]] = Field(
        default_factory=lambda: ["jsonl", "console"],
        description="Where log records go; jsonl writes metrics.jsonl in the run folder.")
    progress: Literal["auto", "bar", "plain", "off"] = Field(
        "auto", description="Progress display; auto: a bar on a terminal, plain lines in a log file. "
                            "The METRIC_DS_PROGRESS environment variable overrides it.")


# The DeepSpeed keys our config decides: (DeepSpeed key path, our key that sets it, its value, or None where
# DeepSpeed derives it or we pass an object instead). The one table of them: ``ds_config.build_ds_config`` writes
# these, and :class:`DeepSpeedConfig` refuses them in the passthrough ``deepspeed.config``.
DEEPSPEED_OWNED: tuple[tuple[str, str, Callable[[Config], Any] | None], ...] = (
    ("train_micro_batch_size_per_gpu", "training.batch_size", lambda c: c.training.batch_size),
    ("train_batch_size", "training.batch_size and training.gradient_accumulation_steps", None),
    ("gradient_accumulation_steps", "training.gradient_accumulation_steps",
     lambda c: c.training.gradient_accumulation_steps),
    ("gradient_clipping", "training.gradient_clip_val", lambda c: c.training.gradient_clip_val),
    ("fp16", "training.mixed_precision", lambda c: {"enabled": c.training.mixed_precision == "fp16"}),
    ("bf16", "training.mixed_precision", lambda c: {"enabled": c.training.mixed_precision == "bf16"}),
    ("optimizer", "optimizer.*", None),  # our fused torch AdamW is passed to deepspeed.initialize
    ("scheduler", "scheduler.*", None),  # our transformers scheduler is passed to deepspeed.initialize
    ("zero_optimization.stage", "deepspeed.zero_stage", lambda c: c.deepspeed.zero_stage),
)
OWNED_KEYS: dict[str, str] = {path: ours for path, ours, _ in DEEPSPEED_OWNED}


class DeepSpeedConfig(_Section):
    """DeepSpeed engine settings; ``config`` passes raw DeepSpeed keys through."""

    section: ClassVar[str] = "deepspeed"

    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage; 0 is plain data parallelism.")
    config: dict[str, Any] = Field(
        default_factory=dict, description="Raw DeepSpeed keys not covered above (keys we set ourselves are refused).")

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

    run_name: str = Field(
        "run", pattern=r"^[A-Za-z0-9._-]+$",
        description="Run folder name: the run goes to checkpointing.checkpoints_dir/run_name (letters, digits, "
                    "'.', '_', '-').")

    @field_validator("run_name")
    @classmethod
    def _inside_checkpoints_dir(cls, name: str) -> str:
        if set(name) == {"."}:
            raise ValueError(f"{name!r} would put the run outside checkpoints_dir; give a plain folder name")
        return name

    model_name: str | None = Field(
        None, description="Hugging Face model folder, or a hub name already in the local cache (metric_ds never "
                          "downloads); null: the bundled all-MiniLM-L6-v2.")
    model: ModelConfig = Field(default_factory=ModelConfig, description=ModelConfig.__doc__)
    data: DataConfig = Field(description=DataConfig.__doc__)
    training: TrainingConfig = Field(default_factory=TrainingConfig, description=TrainingConfig.__doc__)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description=OptimizerConfig.__doc__)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description=SchedulerConfig.__doc__)
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig,
                                               description=CheckpointingConfig.__doc__)
    metric_validation: MetricValidationConfig = Field(default_factory=MetricValidationConfig,
                                                      description=MetricValidationConfig.__doc__)
    open_set: OpenSetConfig = Field(default_factory=OpenSetConfig, description=OpenSetConfig.__doc__)
    neptune: NeptuneConfig = Field(default_factory=NeptuneConfig, description=NeptuneConfig.__doc__)
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description=LoggingConfig.__doc__)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description=DeepSpeedConfig.__doc__)

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
        if key.startswith("knn_") and self.metric_validation.train_bank_steps == 0:
            raise ValueError(f"checkpointing.save_best_by: {key!r} is computed against the embedding bank, which "
                             "metric_validation.train_bank_steps = 0 turns off; raise it or pick loss/acc/f1")
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


def describe_schema_error(err: dict[str, Any]) -> tuple[str, str]:
    """Turn one pydantic error into (key path, message): the config's, and the model folder's schemas'."""
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
        path, message = describe_schema_error(err)
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


def _current_parts(parts: list[str]) -> list[str]:
    """``parts`` of a ``--set`` key under its current name (an old name of :data:`RENAMED_KEYS` warns)."""
    path = ".".join(parts)
    if path not in RENAMED_KEYS:
        return parts
    warnings.warn(f"--set {path}: {path} is deprecated: use {RENAMED_KEYS[path]}", FutureWarning, stacklevel=3)
    return RENAMED_KEYS[path].split(".")


def _old_names_of(path: str) -> list[str]:
    """The old names (last part only) that :data:`RENAMED_KEYS` maps to the dotted key ``path``."""
    return [old.rpartition(".")[2] for old, new in RENAMED_KEYS.items() if new == path]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to raw config data (before validation, so they are validated too).

    A value is read as YAML, except for text keys (``run_name``, paths, choices), which take the text as typed:
    ``--set run_name=2024`` is the name "2024", and ``--set training.mixed_precision=no`` is "no", not false.
    A key's old name (:data:`RENAMED_KEYS`) is accepted with a warning; either name replaces the file's value.
    """
    for item in overrides:
        parts, value = parse_override(item)
        parts = _current_parts(parts)
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
        for old_name in _old_names_of(".".join(parts)):
            node.pop(old_name, None)  # the override replaces the file's value under its old name too
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


def schema_default(key: str) -> Any:
    """The schema's default at a dotted key path (a fresh copy for list defaults), for library functions whose
    default is the config's, e.g. ``schema_default("metric_validation.knn_k")``."""
    return schema_field(key).get_default(call_default_factory=True)
