"""Logging backends: jsonl round trip, console format, tensorboard event files, neptune offline/debug, rank gating."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metric_ds import tracking
from metric_ds.errors import EnvironmentProblem, UserError
from metric_ds.tracking import (
    ConsoleTracker,
    JsonlTracker,
    MultiTracker,
    NeptuneTracker,
    NullTracker,
    Tracker,
    build_trackers,
    flatten_params,
    format_record,
)

PARAMS = {"run_name": "r1", "training": {"lr": 2e-5, "epochs": 3, "fp16": False},
          "neptune": {"tags": ["a", "b"], "project": None}, "model": {}}


def _neptune_cfg(mode: str = "offline", **kw) -> SimpleNamespace:
    return SimpleNamespace(**{"enabled": True, "project": None, "mode": mode, "name": "test-run",
                              "tags": ["unit"], **kw})


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """cwd in tmp_path (neptune offline writes ./.neptune) and no token or mode leaking in from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEPTUNE_API_TOKEN", raising=False)
    monkeypatch.delenv("NEPTUNE_PROJECT", raising=False)
    monkeypatch.delenv("NEPTUNE_MODE", raising=False)
    return tmp_path


# ----------------------------------------------------------------------------------------------- jsonl


@pytest.mark.parametrize("kind", ["float", "tensor", "numpy"])
def test_jsonl_round_trip(tmp_path, kind):
    conv = {"float": float, "tensor": torch.tensor, "numpy": np.float32}[kind]
    rng = np.random.default_rng(1)
    records = [{"step": s, "epoch": s / 4, "train/loss": conv(float(rng.random())),
                "train/ce_rows": torch.tensor(s * 3) if kind == "tensor" else s * 3} for s in range(1, 6)]
    tracker = JsonlTracker(tmp_path)
    for r in records:
        tracker.log_metrics(r, step=r["step"])
        # flushed per line: readable before close (a crash loses nothing)
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == r["step"]
    tracker.close()
    back = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [b["step"] for b in back] == [1, 2, 3, 4, 5]
    for r, b in zip(records, back):
        assert type(b["train/loss"]) is float and type(b["train/ce_rows"]) is int
        assert b["train/loss"] == pytest.approx(float(r["train/loss"]), rel=1e-6)
        assert b["train/ce_rows"] == int(r["train/ce_rows"])
        assert b["epoch"] == r["epoch"]


def test_jsonl_appends_adds_step_and_nulls_nonfinite(tmp_path):
    t = JsonlTracker(tmp_path)
    t.log_metrics({"train/loss": float("nan"), "val/loss": float("inf"), "val/acc": 0.5}, step=7)
    t.close()
    t = JsonlTracker(tmp_path)  # a resumed run appends
    t.log_metrics({"val/acc": np.float64(0.75)}, step=8)
    t.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]  # strict JSON
    assert [json.loads(x) for x in lines] == [
        {"step": 7, "train/loss": None, "val/loss": None, "val/acc": 0.5}, {"step": 8, "val/acc": 0.75}]


# --------------------------------------------------------------------------------------------- console


@pytest.mark.parametrize("value, shown", [(1.23456789, "1.235"), (2e-5, "2e-05"), (12345.678, "1.235e+04"),
                                          (torch.tensor(0.5), "0.5"), (np.float32(3.0), "3"), (42, "42")])
def test_console_format(value, shown):
    line = format_record({"step": 10, "epoch": 0.25, "train/x": value, "val/missing": None}, step=10)
    assert line == f"step 10 ep 0.25 | train/x={shown}"


def test_console_writes_one_line_per_record_through_tqdm(monkeypatch):
    lines = []
    monkeypatch.setattr(tracking.tqdm, "write", lambda s, *a, **k: lines.append(s))
    t = ConsoleTracker()
    t.log_metrics({"step": 3, "train/loss": 0.123456, "train/lr": 1e-4}, step=3)
    t.log_metrics({"val/acc": 0.9}, step=4)
    assert lines == ["step 3 | train/loss=0.1235 train/lr=0.0001", "step 4 | val/acc=0.9"]


# ---------------------------------------------------------------------------------------- build / ranks


def test_non_main_rank_logs_nothing(in_tmp):
    t = build_trackers(["jsonl", "console", "tensorboard", "neptune"], in_tmp / "run", _neptune_cfg(),
                       is_main_process=False)
    assert isinstance(t, NullTracker) and not isinstance(t, MultiTracker)
    t.log_params(PARAMS)
    t.log_metrics({"train/loss": 1.0}, step=1)
    t.close()
    assert not (in_tmp / "run").exists() and not (in_tmp / ".neptune").exists()


def test_build_composite_forwards_to_each(in_tmp, capsys):
    t = build_trackers(["jsonl", "console", "jsonl"], in_tmp, None, is_main_process=True)
    assert isinstance(t, Tracker) and [type(x) for x in t.trackers] == [JsonlTracker, ConsoleTracker]
    t.log_params(PARAMS)
    t.log_metrics({"step": 1, "train/loss": 2.0}, step=1)
    t.close()
    assert json.loads((in_tmp / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 2.0}
    assert "step 1 | train/loss=2" in capsys.readouterr().out


@pytest.mark.parametrize("backends, cfg, match", [(["jsonl", "wandb"], None, "wandb"),
                                                  (["neptune"], None, "neptune section")])
def test_build_rejects_bad_backends(in_tmp, backends, cfg, match):
    with pytest.raises(UserError, match=match):
        build_trackers(backends, in_tmp, cfg, is_main_process=True)


# ----------------------------------------------------------------------------------------- tensorboard


def test_tensorboard_writes_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = build_trackers(["tensorboard"], tmp_path, None, is_main_process=True)
    t.log_params(PARAMS)
    for step in range(1, 4):
        t.log_metrics({"step": step, "train/loss": torch.tensor(1.0 / step), "note": "skipped"}, step=step)
    t.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    scalars = acc.Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx([1.0, 0.5, 1 / 3])
    assert "note" not in acc.Tags()["scalars"] and "step" not in acc.Tags()["scalars"]


def test_tensorboard_missing_package_names_the_fix(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(EnvironmentProblem, match=r"pip install tensorboard.*metric-ds\[tensorboard\]"):
        build_trackers(["jsonl", "tensorboard"], tmp_path, None, is_main_process=True)


# --------------------------------------------------------------------------------------------- neptune


def _offline_ops(root: Path) -> list[dict]:
    runs = list((root / ".neptune" / "offline").glob("run__*"))
    assert len(runs) == 1, runs
    ops = []
    for log in sorted(runs[0].glob("data-*.log")):
        ops += [json.loads(line)["obj"] for line in log.read_text().splitlines() if line.strip()]
    return ops


def test_flatten_params():
    assert flatten_params(PARAMS) == {"run_name": "r1", "training/lr": 2e-5, "training/epochs": 3,
                                      "training/fp16": False, "neptune/tags": "['a', 'b']",
                                      "neptune/project": "None", "model": "{}"}


def test_neptune_offline_writes_local_run(in_tmp, monkeypatch):
    pytest.importorskip("neptune")
    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    t = build_trackers(["neptune"], in_tmp / "run", _neptune_cfg("offline"), is_main_process=True)
    t.log_params(PARAMS)
    t.log_metrics({"step": 1, "epoch": 0.5, "train/loss": torch.tensor(2.0), "val/recall@1": np.float32(0.25)},
                  step=1)
    t.log_metrics({"step": 1, "epoch": 0.5, "val/acc": 0.5}, step=1)  # same step again: epoch not repeated
    t.log_metrics({"step": 2, "epoch": 1.0, "train/loss": 1.5, "train/ce": float("nan")}, step=2)
    t.close()
    ops = _offline_ops(in_tmp)
    assigned = {"/".join(o["path"]): o["value"] for o in ops if o["type"].startswith("Assign")}
    assert assigned["sys/name"] == "test-run"
    assert assigned["parameters/training/lr"] == 2e-5 and assigned["parameters/neptune/tags"] == "['a', 'b']"
    series: dict[str, list] = {}
    for o in ops:
        if o["type"] == "LogFloats":
            series.setdefault("/".join(o["path"]), []).extend((v["step"], v["value"]) for v in o["values"])
    assert series["train/loss"] == [(1, 2.0), (2, 1.5)]
    assert series["val/recall@1"] == [(1, 0.25)] and series["val/acc"] == [(1, 0.5)]
    assert series["epoch"] == [(1, 0.5), (2, 1.0)]
    assert "train/ce" not in series and "step" not in series
    tags = [v for o in ops if o["type"] == "AddStrings" for v in o["values"]]
    assert tags == ["unit"]


def test_neptune_debug_mode(in_tmp):
    pytest.importorskip("neptune")
    t = NeptuneTracker(project=None, mode="debug", name="dbg", tags=[])
    t.log_params(PARAMS)
    for step in range(3):
        t.log_metrics({"train/loss": 1.0 + step, "bank/size": step * 10}, step=step)
    assert t.run["train/loss"].fetch_last() == 3.0 and t.run["bank/size"].fetch_last() == 20
    assert t.run["parameters/training/epochs"].fetch() == 3
    t.close()
    assert not (in_tmp / ".neptune" / "offline").exists()


@pytest.mark.parametrize("project, token, match", [("ws/proj", None, "NEPTUNE_API_TOKEN"),
                                                   (None, "tok", "neptune.project")])
def test_neptune_async_needs_token_from_env_and_project(in_tmp, monkeypatch, project, token, match):
    pytest.importorskip("neptune")
    if token:
        monkeypatch.setenv("NEPTUNE_API_TOKEN", token)
    with pytest.raises(UserError, match=match):
        build_trackers(["neptune"], in_tmp, _neptune_cfg("async", project=project), is_main_process=True)


def test_neptune_missing_package_names_the_fix(in_tmp, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "neptune", None)  # makes `import neptune` raise ImportError
    with pytest.raises(EnvironmentProblem, match=r"pip install 'neptune>=1.10'"):
        build_trackers(["neptune"], in_tmp, _neptune_cfg(), is_main_process=True)


def test_failed_backend_closes_the_ones_already_open(in_tmp, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "neptune", None)
    closed = []
    monkeypatch.setattr(JsonlTracker, "close", lambda self: closed.append(self.path))
    with pytest.raises(EnvironmentProblem):
        build_trackers(["jsonl", "neptune"], in_tmp, _neptune_cfg(), is_main_process=True)
    assert closed == [in_tmp / "metrics.jsonl"]
