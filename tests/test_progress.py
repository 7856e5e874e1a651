"""Progress in log files: plain lines instead of \\r redraws, chosen by config key or environment variable, and
only rank 0 speaks."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
from conftest import BIN, REPO, launch_env, run_launcher

from metric_ds.distributed import free_port
from metric_ds.errors import UserError
from metric_ds.progress import PlainProgress, progress_bar, resolve_mode


@pytest.mark.parametrize("env,setting,tty,expected", [
    (None, "auto", False, "plain"), (None, "auto", True, "bar"), (None, None, False, "plain"),
    (None, "bar", False, "bar"), (None, "off", True, "off"), ("plain", "bar", True, "plain"),
    ("off", "auto", False, "off"), ("BAR", "plain", False, "bar"),
])
def test_mode_from_env_then_config_then_terminal(monkeypatch, env, setting, tty, expected):
    if env is None:
        monkeypatch.delenv("METRIC_DS_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("METRIC_DS_PROGRESS", env)
    stream = io.StringIO()
    stream.isatty = lambda: tty
    monkeypatch.setattr(sys, "stderr", stream)
    assert resolve_mode(setting) == expected


def test_bad_env_value_is_a_user_error(monkeypatch):
    monkeypatch.setenv("METRIC_DS_PROGRESS", "fancy")
    with pytest.raises(UserError, match="METRIC_DS_PROGRESS='fancy': must be one of auto, bar, plain, off"):
        resolve_mode("auto")


def test_plain_lines_are_rate_limited_and_whole(monkeypatch):
    out = io.StringIO()
    bar = PlainProgress(total=10, desc="train", interval=3600, file=out)
    for _ in range(10):
        bar.update()
    bar.set_postfix(loss="0.5000")
    bar.close()
    bar.close()  # no second line for the same count
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()
    assert lines[0].startswith("train: 10/10 (100%) 00:00 elapsed, ") and lines[0].endswith("it/s, loss=0.5000")
    out = io.StringIO()
    with PlainProgress(total=None, desc="embed", unit="rows", interval=0, file=out) as bar:
        bar.update(5)
        bar.update(5)
    assert [line.split(" ")[1] for line in out.getvalue().splitlines()] == ["5", "10"]


@pytest.mark.parametrize("env,kwargs,rank", [("plain", {"enabled": False}, "0"), (None, {"setting": "off"}, "0"),
                                             ("plain", {}, "1")])
def test_factory_off_disabled_and_other_ranks_print_nothing(monkeypatch, capsys, env, kwargs, rank):
    monkeypatch.delenv("METRIC_DS_PROGRESS", raising=False)
    if env:
        monkeypatch.setenv("METRIC_DS_PROGRESS", env)
    monkeypatch.setenv("RANK", rank)
    with progress_bar(3, "x", **kwargs) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_factory_plain_on_rank_0(monkeypatch, capsys):
    monkeypatch.setenv("METRIC_DS_PROGRESS", "plain")
    monkeypatch.setenv("RANK", "0")
    with progress_bar(3, "x") as bar:
        bar.update(3)
    assert capsys.readouterr().err.startswith("x: 3/3 (100%)")


@pytest.mark.slow
def test_two_rank_training_log_file_has_no_redraws_or_duplicates(tmp_path, launch_config):
    """A 2-process training with stdout and stderr sent to one file, as under nohup or a batch scheduler."""
    env = {k: v for k, v in launch_env().items() if k != "METRIC_DS_PROGRESS"}
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        proc = run_launcher([str(BIN / "torchrun"), "--nproc_per_node", "2",
                               "--master_port", str(free_port()), "-m", "metric_ds.train", "--config", str(launch_config)],
                              cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    duplicates = sorted({line for line in lines if lines.count(line) > 1})
    assert not duplicates, duplicates
    assert sum(line.startswith("train: 3/3 (100%)") for line in lines) == 1
    assert sum(line.startswith("done: 3 steps") for line in lines) == 1
