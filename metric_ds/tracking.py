"""Logging backends: ``jsonl`` (``metrics.jsonl``), ``console``, ``tensorboard`` and ``neptune``. Only rank 0 logs.

Pick them with ``logging.backends`` in the config; :func:`build_trackers` returns one composite :class:`Tracker`
that the training loop calls with ``log_params`` once, ``log_metrics`` per record and ``close`` at the end.

* ``jsonl``: one JSON object per record appended to ``RUN_DIR/metrics.jsonl`` and flushed at once, so a crash
  loses nothing; ``metric-ds report`` reads this file. Tensors and numpy scalars become plain numbers, NaN and
  infinities become ``null`` (strict JSON).
* ``console``: one compact line per record (4 significant digits) printed with ``tqdm.write`` so progress bars
  stay intact.
* ``tensorboard``: scalars under ``RUN_DIR/tensorboard`` (``pip install tensorboard`` or ``metric-ds[tensorboard]``);
  view them with ``tensorboard --logdir RUN_DIR/tensorboard``.
* ``neptune``: the neptune 1.x client (``pip install "neptune>=1.10"`` or ``metric-ds[neptune]``); the resolved
  config goes to ``parameters/...`` and every metric to a series of the same name (``train/loss``, ...).

Neptune after March 2026: neptune.ai's hosted service shut down, so ``neptune.mode: async`` only works against a
self-hosted Neptune server. Two ways to keep using it:

* ``mode: offline`` (the default): the run is written under ``.neptune/`` in the working directory, with no
  network and no token. Upload it later with ``neptune sync`` (or ``neptune sync --path DIR``) after pointing
  ``NEPTUNE_API_TOKEN`` at a server that accepts it. ``mode: debug`` stores nothing (smoke tests).
* ``mode: async`` with a self-hosted server: export ``NEPTUNE_API_TOKEN`` with that server's token (the token
  encodes the server address) and set ``neptune.project`` to its ``workspace/project``.

The API token is read only from the ``NEPTUNE_API_TOKEN`` environment variable, never from the config, so
configs can be shared without leaking it.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tqdm.auto import tqdm

from metric_ds.errors import EnvironmentProblem, UserError

BACKENDS = ("jsonl", "console", "tensorboard", "neptune")
_NEPTUNE_MODES = ("async", "offline", "debug")


@runtime_checkable
class Tracker(Protocol):
    """Where metrics go. Implementations must accept any metric names (``train/...``, ``val/...``, ``bank/...``)."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record the run's (nested) configuration once, at the start."""

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Record one set of metrics at optimizer step ``step``; values may be floats, ints, tensors, numpy."""

    def close(self) -> None:
        """Flush and release files or connections; the tracker is not used afterwards."""


def _plain(value: Any) -> Any:
    """A 0-d tensor or numpy scalar -> a Python number; anything else unchanged."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # a tensor or array with several elements: keep it as a list
            value = value.tolist() if hasattr(value, "tolist") else value
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class NullTracker:
    """Logs nothing: ranks other than 0, and the base class of the real backends."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlTracker(NullTracker):
    """Appends one JSON object per record to ``run_dir/metrics.jsonl``, flushed at once (a crash loses nothing).

    Every line has ``step`` (added from the argument when the record lacks it). NaN and infinities are written
    as ``null``. A resumed run appends to the same file.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": int(step), **{k: _finite_or_none(_plain(v)) for k, v in metrics.items()}}
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def format_record(metrics: Mapping[str, Any], step: int) -> str:
    """The console line for one record: ``step 10 ep 0.25 | train/loss=1.234 train/lr=2e-05``."""
    head = f"step {step}"
    epoch = _plain(metrics.get("epoch"))
    if _is_number(epoch):
        head += f" ep {epoch:.3g}"
    parts = []
    for key, value in metrics.items():
        if key in ("step", "epoch"):
            continue
        value = _plain(value)
        if value is None:
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return head + (" | " + " ".join(parts) if parts else "")


class ConsoleTracker(NullTracker):
    """One compact line per record, printed above the progress bar with ``tqdm.write``."""

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        tqdm.write(format_record(metrics, step))


class TensorBoardTracker(NullTracker):
    """Scalars and the config (as text) in ``run_dir/tensorboard`` via ``torch.utils.tensorboard``."""

    def __init__(self, run_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise EnvironmentProblem("logging.backends has 'tensorboard' but the tensorboard package is missing: "
                                     "pip install tensorboard (or pip install 'metric-ds[tensorboard]'), "
                                     "or remove it from logging.backends") from None
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_params(self, params: dict[str, Any]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=2, default=str) + "\n```")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            value = _plain(value)
            if key != "step" and _is_number(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"training/lr": 2e-05, ...}``; lists and None become strings (what neptune accepts).

    Args:
        data: the nested config (``Config.to_dict()``).
        prefix: prepended to every key (used by the recursion).

    Returns:
        A flat dict of str, int, float and bool values.
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                out.update(flatten_params(value, name + "/"))
            else:
                out[name] = "{}"
        elif isinstance(value, (str, bool, int, float)):
            out[name] = value
        else:  # None, lists, tuples, paths: neptune has no field type for them
            out[name] = str(value)
    return out


class NeptuneTracker(NullTracker):
    """The neptune 1.x client (see the module docstring for offline use and self-hosted servers).

    Args:
        project: ``workspace/project``; required in ``async`` mode, optional otherwise.
        mode: ``async`` (a server), ``offline`` (``.neptune/`` in the working directory, ``neptune sync`` later)
            or ``debug`` (nothing stored).
        name: the run's display name.
        tags: the run's tags.
    """

    def __init__(self, project: str | None, mode: str, name: str | None, tags: list[str] | tuple[str, ...] = ()):
        if mode not in _NEPTUNE_MODES:
            raise UserError(f"neptune.mode: {mode!r} is not one of {', '.join(_NEPTUNE_MODES)}")
        try:
            import neptune
        except ImportError:
            raise EnvironmentProblem("neptune logging needs the neptune 1.x client: pip install 'neptune>=1.10' "
                                     "(or pip install 'metric-ds[neptune]')") from None
        token = os.environ.get("NEPTUNE_API_TOKEN")
        if mode == "async":
            problems = []
            if not token:
                problems.append("neptune.mode is 'async' but NEPTUNE_API_TOKEN is not set: export the token of "
                                "your (self-hosted) Neptune server, or use neptune.mode: offline and "
                                "`neptune sync` later")
            if not project:
                problems.append("neptune.mode is 'async' but neptune.project is empty: set it to "
                                "'workspace/project' on your Neptune server")
            if problems:
                raise UserError(problems)
        self._last_step: dict[str, int] = {}
        self.run = neptune.init_run(project=project, mode=mode, name=name, tags=list(tags or []),
                                    api_token=token, capture_hardware_metrics=False, capture_stdout=False,
                                    capture_stderr=False)

    def log_params(self, params: dict[str, Any]) -> None:
        flat = flatten_params(params)
        if flat:
            self.run["parameters"] = flat

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            value = _plain(value)
            if key == "step" or not _is_number(value) or not math.isfinite(value):
                continue
            # Neptune series need increasing steps; a repeat (e.g. `epoch` in a train and a val record of the
            # same step, or steps replayed after a resume) would be rejected by the server, so skip it here.
            if step <= self._last_step.get(key, -1):
                continue
            self._last_step[key] = step
            self.run[key].append(value, step=step)

    def close(self) -> None:
        self.run.stop()


class MultiTracker(NullTracker):
    """Forwards every call to each tracker in order."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)

    def log_params(self, params: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def build_trackers(backends: list[str], run_dir: str | Path, neptune_cfg: Any, is_main_process: bool) -> Tracker:
    """The trackers named in ``logging.backends``, as one composite (a no-op tracker on ranks other than 0).

    Args:
        backends: names from :data:`BACKENDS`; repeats are ignored.
        run_dir: the run folder (``checkpoints_dir/run_name``).
        neptune_cfg: an object with ``project``, ``mode``, ``name`` and ``tags`` (the config's ``neptune``
            section); only read when ``"neptune"`` is in ``backends``.
        is_main_process: whether this is rank 0; other ranks get a :class:`NullTracker` and open nothing.

    Returns:
        A :class:`Tracker`.

    Raises:
        UserError: an unknown backend name, or neptune without its settings.
        EnvironmentProblem: an optional backend whose package is missing.
    """
    if not is_main_process:
        return NullTracker()
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UserError(f"logging.backends: unknown backend(s) {', '.join(map(repr, unknown))}; "
                        f"choose from {', '.join(BACKENDS)}")
    trackers: list[Tracker] = []
    try:
        for name in dict.fromkeys(backends):
            if name == "jsonl":
                trackers.append(JsonlTracker(run_dir))
            elif name == "console":
                trackers.append(ConsoleTracker())
            elif name == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir))
            elif name == "neptune":
                if neptune_cfg is None:
                    raise UserError("logging.backends has 'neptune' but there is no neptune section to read "
                                    "project/mode/name/tags from")
                trackers.append(NeptuneTracker(neptune_cfg.project, neptune_cfg.mode, neptune_cfg.name,
                                               neptune_cfg.tags))
    except BaseException:
        for t in trackers:  # do not leak open files when a later backend fails
            t.close()
        raise
    return MultiTracker(trackers)
