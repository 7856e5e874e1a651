"""Resuming a run: the plan (which checkpoint, which DeepSpeed tag, the position on another world size), what may
change when a run is resumed, and the refusal of what may not.

:func:`plan_resume` runs before the DeepSpeed engine exists: it finds the checkpoint, reads our state in it, checks
the config and data against it (:func:`check_resume`), and on another world size remaps the position in the epoch
and picks DeepSpeed's universal form of a ZeRO 1-3 state.

A checkpoint stores the resolved config and a fingerprint of the training data. A resume compares them with the
current ones:

* **Safe to change** (:data:`SAFE_KEYS`): where the run is written and logged, how often it validates, logs and
  checkpoints, the data loader's workers, the retrieval metrics' settings, the open-set calibration that follows
  training, and the data file's path (the data itself must be the same: the fingerprint says so).
* **Keys newer than the checkpoint**: a key the checkpoint's config lacks (a version before the key existed)
  that is at its default now is what that version did, so it is no change.
* **The length of the run** (``training.num_epochs``, ``training.max_steps``): only where the learning-rate
  schedule does not depend on it, so that the lr does not jump: a ``constant`` or ``constant_with_warmup``
  schedule, or an explicit ``scheduler.num_training_steps``.
* **Everything else** (the model, the batch, the seed, the loss, the optimizer, the schedule, the data) decides
  the weights, the sampler's order or the shape of the saved state: a change is refused, with the list. The model
  is compared as what ``model_name`` loads, not as spelled: null and the bundled model's own path are one model.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from tqdm.auto import tqdm

from metric_ds import distributed as D
from metric_ds.checkpoint import DS_TAG, UNIVERSAL_TAG, ensure_universal, read_client_state, resolve_resume
from metric_ds.config import current_key, schema_default
from metric_ds.errors import UserError

if TYPE_CHECKING:
    from metric_ds.config import Config

SAFE_KEYS = (
    "run_name", "checkpointing.checkpoints_dir", "checkpointing.save_every_n_batches",
    "checkpointing.keep_last_n_checkpoints", "checkpointing.overwrite", "training.resume_from",
    "training.log_every_n_steps", "training.eval_every_n_steps", "data.num_workers", "data.train_path",
    "data.val_path", "logging.", "neptune.", "metric_validation.recall_at_k", "metric_validation.knn_k",
    "metric_validation.distance", "metric_validation.eval_batch_size", "open_set.",
)
LENGTH_KEYS = ("training.num_epochs", "training.max_steps")
_LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; the passthrough ``deepspeed.config`` is compared whole."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path != "deepspeed.config":
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_KEYS)


def _at_default(key: str, value: Any) -> bool:
    """Whether ``value`` is the schema's default for ``key`` (a dotted path); False for a key the schema lacks."""
    try:
        return schema_default(key) == value
    except (KeyError, AttributeError, TypeError):
        return False


def _model_identity(name: Any) -> Any:
    """What ``model_name`` loads, so that spellings of one model compare equal: ``None`` is the bundled model's
    folder (as :func:`metric_ds.model.resolve_model_name` resolves it), a local folder its absolute path, and any
    other value (a hub name) itself."""
    from metric_ds.model import default_model_path

    if name is None:
        try:
            name = default_model_path()
        except UserError:  # the bundled model is not installed: only the spelling can be compared
            return None
    path = Path(str(name))
    return str(path.resolve()) if path.is_dir() else name


def check_resume(saved_config: dict[str, Any] | None, saved_fingerprint: str | None, config: dict[str, Any],
                 fingerprint: str, checkpoint: str) -> None:
    """Refuse a resume whose config or data changed in a way that breaks the run.

    Args:
        saved_config, saved_fingerprint: what the checkpoint recorded (None for checkpoints of older versions,
            which are then resumed with a warning).
        config: the current resolved config (``Config.to_dict()``).
        fingerprint: the current data's fingerprint.
        checkpoint: the checkpoint folder, for messages.

    Raises:
        UserError: listing every refused change, with the old and new values.
    """
    if saved_config is None:
        warnings.warn(f"{checkpoint} records no config (an older metric_ds wrote it): changes to the config since "
                      "then are not checked", stacklevel=2)
        return
    # A checkpoint saved before a key was renamed (config.RENAMED_KEYS) holds it under its old name.
    old = {current_key(k): v for k, v in flatten(saved_config).items()}
    new = flatten(config)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not _safe(k)
                     and not (k not in old and _at_default(k, new[k])))
    if "model_name" in changed and _model_identity(old.get("model_name")) == _model_identity(new.get("model_name")):
        changed.remove("model_name")  # null and the bundled model's path (or two paths of one folder): one model
    problems = []
    length = [k for k in changed if k in LENGTH_KEYS]
    schedule_fixed = (new.get("scheduler.name") in _LENGTH_FREE_SCHEDULES
                      or new.get("scheduler.num_training_steps") is not None)
    if length and schedule_fixed:
        changed = [k for k in changed if k not in LENGTH_KEYS]
    for key in changed:
        why = (" (the lr schedule's length follows the run's length: set scheduler.num_training_steps, or use a "
               "constant schedule, to change it on resume)") if key in LENGTH_KEYS else ""
        problems.append(f"{key}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now{why}")
    if saved_fingerprint is not None and saved_fingerprint != fingerprint:
        problems.append("the training data differ from the data the checkpoint was trained on (rows, labels or "
                        "masks, after the split)")
    if problems:
        raise UserError([f"training.resume_from: {checkpoint} cannot continue with this config; what changed:",
                         *problems, "Restore these settings to resume, or start a new run "
                         "(checkpointing.overwrite: true, or another run_name)"])


@dataclass
class ResumePlan:
    """A checkpoint to resume from, read before the engine exists.

    Attributes:
        checkpoint: its ``step-N`` folder.
        client: our state in it (loop, RNGs, bank, config, data fingerprint), the loop position remapped to this
            world size.
        tag: the DeepSpeed tag to load: the checkpoint's own, or on another world size its universal form.
    """

    checkpoint: Path
    client: dict[str, Any]
    tag: str


def plan_resume(cfg: Config, run_dir: Path, fingerprint: str, micro_per_epoch: int) -> ResumePlan | None:
    """The checkpoint that ``training.resume_from`` names, with the config and data checked against it, or None
    for a fresh run.

    Args:
        cfg: the run's config.
        run_dir: the run folder (``latest`` is looked up there).
        fingerprint: the current training data's fingerprint.
        micro_per_epoch: this world size's micro-batches per epoch (the remapped position stays within it).
    """
    if not cfg.training.resume_from:
        return None
    ckpt = resolve_resume(cfg.training.resume_from, run_dir)
    client = read_client_state(ckpt)
    check_resume(yaml.safe_load(client["config"]) if "config" in client else None,
                 client.get("data_fingerprint"), cfg.to_dict(), fingerprint, str(ckpt))
    saved_world = int(client.get("world_size", D.world_size()))
    if saved_world == D.world_size():
        return ResumePlan(ckpt, client, DS_TAG)
    loop = client["loop"]
    loop["batch_in_epoch"] = remap_position(loop["batch_in_epoch"], saved_world, cfg.training.batch_size,
                                            micro_per_epoch)
    if D.is_main():
        tqdm.write(f"resuming a checkpoint of {saved_world} process(es) on {D.world_size()}: the sampler position "
                   "and the bank remapped, the RNG streams started afresh (the run continues, not bit for bit)")
    if cfg.deepspeed.zero_stage == 0:  # every rank saved the whole state: it loads on any world size
        return ResumePlan(ckpt, client, DS_TAG)
    ensure_universal(ckpt)  # ZeRO 1-3 partitions the state by rank: DeepSpeed's universal form re-partitions it
    return ResumePlan(ckpt, client, UNIVERSAL_TAG)


def remap_position(batch_in_epoch: int, saved_world: int, batch_size: int, micro_per_epoch: int) -> int:
    """The position in the epoch, in this world size's micro-batches: the rows that the saved ranks consumed
    together, rounded down to whole global batches of the new world size (at most one global batch of rows is
    seen twice this epoch)."""
    rows = batch_in_epoch * batch_size * saved_world
    return min(rows // (batch_size * D.world_size()), micro_per_epoch)
