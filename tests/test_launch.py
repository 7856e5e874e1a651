"""Multi-process launches on CPU (gloo): the deepspeed launcher, torchrun, and a two-node run simulated on one
machine. Each finishes a 3-step training with validation and a checkpoint, and its ranks agree on the bank and
the validation metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_frame

from metric_ds.distributed import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{BIN}:{env.get('PATH', '')}")
    return env


@pytest.fixture
def config(tmp_path, tiny_model_dir) -> Path:
    table = tmp_path / "t.parquet"
    make_frame(96).to_parquet(table)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "run_name": "launch", "model_name": str(tiny_model_dir), "data": {"train_path": str(table)},
        "training": {"batch_size": 8, "num_epochs": 1, "max_steps": 3, "eval_every_n_steps": 3,
                     "max_seq_length": 16, "log_every_n_steps": 1},
        "checkpointing": {"checkpoints_dir": str(tmp_path / "runs"), "save_every_n_batches": 3},
    }))
    return path


def check_run(tmp_path: Path, world: int) -> None:
    run = tmp_path / "runs" / "launch"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == world
    assert summary["ranks_agree"], summary["rank_digests"]
    assert len(summary["rank_digests"]) == world
    assert (run / "checkpoints" / "latest").read_text() == "step-3"
    assert (run / "best" / "heads.safetensors").is_file()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/acc" in r for r in records)
    ce_rows = [r["train/ce_rows"] for r in records if "train/ce_rows" in r]
    assert ce_rows and all(v == 8 * world for v in ce_rows)  # the loss sees the global batch


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_deepspeed_launcher_two_processes(tmp_path, config):
    run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "metric_ds/train.py",
         "--config", str(config)])
    check_run(tmp_path, 2)


def test_torchrun_two_processes(tmp_path, config):
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "metric_ds.train",
         "--config", str(config)])
    check_run(tmp_path, 2)


def test_two_nodes_simulated_on_one_machine(tmp_path, config):
    port = str(free_port())
    cmds = [[str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
             "--master_addr", "127.0.0.1", "--master_port", port, "-m", "metric_ds.train", "--config", str(config)]
            for rank in (0, 1)]
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    check_run(tmp_path, 2)
