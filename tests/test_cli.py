"""The CLI: user errors exit 1 with `error:` lines and no traceback; validate, prepare, evaluate, report, env."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import BANKING77, REPO, launch_env, make_frame, write_cfg

from metric_ds.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metric_ds", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env=launch_env())


def test_config_errors_exit_1_without_traceback(tmp_path, capsys):
    cfg = write_cfg(tmp_path / "cfg.yaml", {"data": {"train_path": "x.parquet", "val_ratio": 2},
                               "training": {"supcon_temperature": -0.1, "batch_sise": 3}})
    assert main(["validate", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    assert "training.supcon_temperature: must be > 0" in err and "data.val_ratio: must be < 1" in err
    assert "training.batch_sise: unknown key; did you mean 'batch_size'?" in err


def test_debug_shows_the_traceback(tmp_path):
    cfg = write_cfg(tmp_path / "cfg.yaml", {"data": {}})
    with pytest.raises(ValueError):
        main(["--debug", "validate", "--config", str(cfg)])


def test_data_errors_name_file_and_exit_1(tmp_path, capsys):
    path = tmp_path / "t.csv"
    pd.DataFrame({"text": ["a", "b"], "category": [1, 2]}).to_csv(path, index=False)
    cfg = write_cfg(tmp_path / "cfg.yaml", {"data": {"train_path": str(path)}})
    assert main(["validate", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"error: {path}: missing column(s) label, metric_mask, classifier_mask" in err


def test_fp16_on_cpu_is_a_user_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    table = tmp_path / "t.parquet"
    make_frame(40).to_parquet(table)
    cfg = write_cfg(tmp_path / "cfg.yaml",
                    {"data": {"train_path": str(table)}, "training": {"mixed_precision": "fp16"}})
    assert main(["validate", "--config", str(cfg)]) == 1
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err


def test_unknown_model_name_is_a_user_error(tmp_path, capsys):
    table = tmp_path / "t.parquet"
    make_frame(40).to_parquet(table)
    cfg = write_cfg(tmp_path / "cfg.yaml",
                    {"data": {"train_path": str(table)}, "model_name": "nobody/nothing-here"})
    assert main(["validate", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "neither a local directory nor a model in the local Hugging Face cache" in err
    assert "http" not in err.lower()


def test_validate_prints_a_summary(tmp_path, capsys):
    table = tmp_path / "t.parquet"
    make_frame(80).to_parquet(table)
    cfg = write_cfg(tmp_path / "cfg.yaml",
                    {"data": {"train_path": str(table)}, "training": {"batch_size": 16}})
    assert main(["validate", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "rows: 71 train, 9 validation; 4 classes" in out  # per-class rounding of 10%: 2+2+3+2
    assert "SupCon anchors with >= 1 positive at batch size 16" in out and "ok:" in out


@pytest.mark.skipif(not (BANKING77 / "train.csv").is_file(), reason="BANKING77 not beside the repository")
def test_prepare_and_validate_banking77(tmp_path, capsys):
    out = tmp_path / "b77.parquet"
    assert main(["prepare", "--input", str(BANKING77 / "train.csv"), "--output", str(out), "--text-column", "text",
                 "--label-column", "category", "--classifier-per-class", "10"]) == 0
    assert "rows=10003, classes=77, classifier_rows=770, metric_rows=10003" in capsys.readouterr().out
    cfg = write_cfg(tmp_path / "cfg.yaml", {"data": {"train_path": str(out)}, "training": {"batch_size": 64}})
    assert main(["validate", "--config", str(cfg)]) == 0
    assert "77 classes" in capsys.readouterr().out


def test_prepare_missing_input_exits_1(tmp_path, capsys):
    assert main(["prepare", "--input", str(tmp_path / "no.csv"), "--output", str(tmp_path / "o.parquet")]) == 1
    assert "file not found" in capsys.readouterr().err


def test_env_reports_the_op(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "supcon op: cpu_available" in out and "supcon op: cuda" in out


@pytest.mark.slow
def test_train_evaluate_report_end_to_end(tmp_path, tiny_model_dir):
    """`metric-ds train` (the console entry), then evaluate and report on the tiny run, as subprocesses."""
    table = tmp_path / "t.parquet"
    make_frame(96).to_parquet(table)
    test_table = tmp_path / "test.csv"
    make_frame(40, seed=9).to_csv(test_table, index=False)
    cfg = write_cfg(tmp_path / "cfg.yaml", {
        "run_name": "e2e", "model_name": str(tiny_model_dir),
        "data": {"train_path": str(table)},
        "training": {"batch_size": 8, "num_epochs": 1, "max_seq_length": 16, "log_every_n_steps": 2},
        "checkpointing": {"checkpoints_dir": str(tmp_path / "runs"), "save_every_n_batches": 5},
        "logging": {"backends": ["jsonl", "console", "tensorboard"]},
    })
    proc = subprocess.run([sys.executable, "train_metric_classifier.py", "--config", str(cfg)], capture_output=True,
                          text=True, cwd=REPO, timeout=600, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "e2e"
    assert (run / "best" / "heads.json").is_file() and (run / "checkpoints" / "latest").is_file()
    assert list((run / "tensorboard").glob("events.*"))
    proc = run_cli("evaluate", "--model", str(run / "best"), "--data", str(test_table), "--knn-k", "3",
                   "--recall-at-k", "1", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout and "recall@3" in proc.stdout
    ev = json.loads((run / "best" / "eval" / "test.json").read_text())
    assert 0 <= ev["accuracy"] <= 1 and set(ev["per_class_f1"]) == {f"class_{i}" for i in range(4)}
    assert ev["retrieval"]["recall@1"] <= ev["retrieval"]["recall@3"]
    assert ev["bank_data"] == str(table.resolve())
    proc = run_cli("report", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (run / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "summary" in html
    for png in (run / "report").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "report" / "per_class_f1_0.png").is_file()
