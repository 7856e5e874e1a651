"""The README's "Use your model" code runs as written, against a tiny trained run.

Blocks marked ``<!-- readme-test: python -->`` are executed; in blocks marked ``<!-- readme-test: bash -->``
every ``metric-ds`` line is run through the CLI. The README's example paths are replaced by the tiny run's.
"""
from __future__ import annotations

import re
import shlex

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, make_frame

from metric_ds.cli import main

BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\s*```(\w+)\n(.*?)```", re.DOTALL)


def blocks(kind: str) -> list[str]:
    found = [code for tag, lang, code in BLOCK.findall((REPO / "README.md").read_text()) if tag == kind]
    assert found, f"no README block marked readme-test: {kind}"
    return found


@pytest.fixture
def workdir(tmp_path, tiny_run, monkeypatch):
    """A working directory where the README's paths exist: runs/example/best, data/train.parquet, new.csv."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "example").symlink_to(tiny_run)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.parquet").symlink_to(tiny_run.parent.parent / "train.parquet")
    make_frame(12, seed=1)[["text"]].to_csv(tmp_path / "new.csv", index=False)
    return tmp_path


@pytest.mark.parametrize("code", blocks("python"))
def test_python_blocks_run(workdir, code, capsys):
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "class_" in out


@pytest.mark.parametrize("code", blocks("bash"))
def test_cli_blocks_run(workdir, code):
    lines = [line for line in code.splitlines() if line.startswith("metric-ds ")]
    assert lines
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0, line
    predicted = pd.read_csv(workdir / "predicted.csv")
    assert {"text", "pred_label", "pred_score", "top3_label", "knn_label"} <= set(predicted.columns)
    assert np.load(workdir / "vectors.npy").shape == (12, 16)
