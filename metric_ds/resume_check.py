"""What may change when a run is resumed, and the refusal of what may not.

A checkpoint stores the resolved config and a fingerprint of the training data. A resume compares them with the
current ones:

* **Safe to change** (:data:`SAFE_KEYS`): where the run is written and logged, how often it validates, logs and
  checkpoints, the data loader's workers, the retrieval metrics' settings, and the data file's path (the data
  itself must be the same: the fingerprint says so).
* **The length of the run** (``training.num_epochs``, ``training.max_steps``): only where the learning-rate
  schedule does not depend on it, so that the lr does not jump: a ``constant`` or ``constant_with_warmup``
  schedule, or an explicit ``scheduler.num_training_steps``.
* **Everything else** (the model, the batch, the seed, the loss, the optimizer, the schedule, the data) decides
  the weights, the sampler's order or the shape of the saved state: a change is refused, with the list.
"""
from __future__ import annotations

import warnings
from typing import Any

from metric_ds.config import current_key
from metric_ds.errors import UserError

SAFE_KEYS = (
    "run_name", "checkpointing.checkpoints_dir", "checkpointing.save_every_n_batches",
    "checkpointing.keep_last_n_checkpoints", "checkpointing.overwrite", "training.resume_from",
    "training.log_every_n_steps", "training.eval_every_n_steps", "data.num_workers", "data.train_path",
    "data.val_path", "logging.", "neptune.", "metric_validation.recall_at_k", "metric_validation.knn_k",
    "metric_validation.distance", "metric_validation.eval_batch_size",
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
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not _safe(k))
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
