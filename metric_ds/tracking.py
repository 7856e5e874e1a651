"""Logging backends: ``jsonl`` (``metrics.jsonl``), ``console``, ``tensorboard`` and ``neptune``. Only rank 0 logs.

Neptune: neptune.ai's hosted service shut down in March 2026. Use ``neptune.mode: offline`` (runs are written
under ``.neptune/`` in the working directory; upload them later with ``neptune sync`` against a self-hosted
server), ``debug`` (nothing is stored), or ``async`` against a self-hosted server: set ``NEPTUNE_API_TOKEN``
to that server's token and ``neptune.project`` to its ``workspace/project``. The token is read only from the
environment, never from the config.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from metric_ds.errors import EnvironmentProblem


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def _plain(value: Any) -> Any:
    """Tensors, numpy scalars -> Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    return value


class NullTracker:
    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlTracker(NullTracker):
    """Appends one JSON object per record to ``run_dir/metrics.jsonl``, flushed at once (a crash loses nothing)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        record = {k: _plain(v) for k, v in metrics.items()}
        record = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class ConsoleTracker(NullTracker):
    """One compact line per record, printed above the progress bar."""

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        parts = [f"step {step}"]
        for key, value in metrics.items():
            if key in ("step", "epoch"):
                continue
            value = _plain(value)
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        tqdm.write(" ".join(parts))


class TensorBoardTracker(NullTracker):
    def __init__(self, run_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise EnvironmentProblem("logging.backends has tensorboard but the package is missing: "
                                     "pip install tensorboard (or metric-ds[tensorboard])") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log_params(self, params: dict[str, Any]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=2, default=str) + "\n```")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            value = _plain(value)
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (list, tuple)) or value is None:
            out[name] = str(value)
        else:
            out[name] = value
    return out


class NeptuneTracker(NullTracker):
    """The neptune 1.x client. Args mirror ``neptune`` config: project, mode, name, tags."""

    def __init__(self, project: str | None, mode: str, name: str | None, tags: list[str]):
        try:
            import neptune
        except ImportError:
            raise EnvironmentProblem("logging to neptune needs its client: pip install neptune "
                                     "(or metric-ds[neptune])") from None
        self.run = neptune.init_run(project=project, mode=mode, name=name, tags=list(tags),
                                    api_token=os.environ.get("NEPTUNE_API_TOKEN"),
                                    capture_hardware_metrics=False, capture_stdout=False, capture_stderr=False)

    def log_params(self, params: dict[str, Any]) -> None:
        self.run["parameters"] = _flatten(params)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            value = _plain(value)
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not (isinstance(value, float) and math.isnan(value)):
                self.run[key].append(value, step=step)

    def close(self) -> None:
        self.run.stop()


class MultiTracker(NullTracker):
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

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
    """The trackers named in ``logging.backends`` (a no-op tracker on ranks other than 0)."""
    if not is_main_process:
        return NullTracker()
    trackers: list[Tracker] = []
    for name in dict.fromkeys(backends):
        if name == "jsonl":
            trackers.append(JsonlTracker(run_dir))
        elif name == "console":
            trackers.append(ConsoleTracker())
        elif name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir))
        elif name == "neptune":
            trackers.append(NeptuneTracker(neptune_cfg.project, neptune_cfg.mode, neptune_cfg.name, neptune_cfg.tags))
        else:
            raise ValueError(f"logging.backends: unknown backend {name!r}")
    return MultiTracker(trackers)
