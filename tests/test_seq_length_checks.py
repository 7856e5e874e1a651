"""``--max-seq-length`` is checked the way training checks ``training.max_seq_length`` (one function,
:func:`metric_ds.preflight.check_max_seq_length`): at least the schema's bound, at most the model's positions, in
every command that takes it (evaluate, pseudo-label) and in ``metric_ds.load``."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import make_frame
from transformers import BertConfig, RobertaConfig

import metric_ds
from metric_ds.cli import main
from metric_ds.errors import UserError
from metric_ds.preflight import check_max_seq_length, seq_length_problem

LONG_TEXT = " ".join(["card"] * 400)  # far beyond the tiny model's 128 positions
# value -> what the one error line says
BAD = {"100000": r"--max-seq-length: 100000 is longer than the model \(.*\) can read: .* at most 128",
       "0": r"--max-seq-length must be > 1, got 0",
       "-4": r"--max-seq-length must be > 1, got -4"}


@pytest.fixture
def tables(tmp_path) -> tuple[Path, Path]:
    """A labelled table with one long text (for evaluate), and the same with some labels empty (pseudo-label)."""
    frame = make_frame(40)
    frame.loc[0, "text"] = LONG_TEXT
    labelled, partly = tmp_path / "labelled.parquet", tmp_path / "partly.parquet"
    frame.to_parquet(labelled)
    frame.assign(label=[*frame["label"][:30], *[None] * 10]).to_parquet(partly)
    return labelled, partly


def _one_error(capsys, pattern: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("value", list(BAD))
def test_evaluate_checks_max_seq_length(value, tiny_run, tables, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(tiny_run), "--data", str(tables[0]), "--output", str(out),
            "--device", "cpu", "--max-seq-length", value]
    assert main(argv) == 1
    _one_error(capsys, BAD[value])
    assert not out.exists()


@pytest.mark.parametrize("model", ["export", "encoder"])
@pytest.mark.parametrize("value", list(BAD))
def test_pseudo_label_checks_max_seq_length(value, model, tiny_run, tiny_model_dir, tables, tmp_path, capsys):
    out = tmp_path / "pl.parquet"
    folder = tiny_run / "best" if model == "export" else tiny_model_dir
    argv = ["pseudo-label", "--input", str(tables[1]), "--output", str(out), "--model", str(folder),
            "--max-seq-length", value]
    assert main(argv) == 1
    _one_error(capsys, BAD[value])
    assert not out.exists()


@pytest.mark.parametrize("value", [100000, 0, -4])
def test_load_checks_max_seq_length(value, tiny_run):
    with pytest.raises(UserError, match=r"max_seq_length.* (at most 128|must be > 1)"):
        metric_ds.load(tiny_run, device="cpu", max_seq_length=value)


def test_a_length_the_model_can_read_is_taken(tiny_run, tables, tmp_path, capsys):
    assert metric_ds.load(tiny_run, device="cpu", max_seq_length=128).max_seq_length == 128
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tiny_run), "--data", str(tables[0]), "--output", str(out),
                 "--device", "cpu", "--max-seq-length", "128"]) == 0
    assert out.is_file()


def test_the_check_reads_positions_and_the_schemas_bound():
    bert = BertConfig(max_position_embeddings=64)
    assert seq_length_problem(64, bert, "--max-seq-length", "m") is None
    assert "at most 64" in seq_length_problem(65, bert, "--max-seq-length", "m")
    assert "at most 512" in seq_length_problem(600, RobertaConfig(max_position_embeddings=514), "k", "m")
    assert seq_length_problem(2, bert, "k", "m") is None  # the schema's bound: > 1
    assert seq_length_problem(1, bert, "k", "m").startswith("k must be > 1")
    with pytest.raises(UserError, match=r"^--max-seq-length: 65 is longer than the model \(m\)"):
        check_max_seq_length(65, bert, "--max-seq-length", "m")
