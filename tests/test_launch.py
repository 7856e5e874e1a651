"""Multi-process launches on CPU (gloo): the deepspeed launcher, torchrun, and a two-node run simulated on one
machine. Each finishes a 3-step training with validation and a checkpoint, and its ranks agree on the bank and
the validation metrics."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import BIN, REPO, launch, launch_env, records, run_launcher

from metric_ds.distributed import free_port

pytestmark = pytest.mark.slow


def check_run(tmp_path: Path, world: int) -> None:
    run = tmp_path / "runs" / "launch"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == world
    assert summary["ranks_agree"], summary["rank_digests"]
    assert len(summary["rank_digests"]) == world
    assert (run / "checkpoints" / "latest").read_text() == "step-3"
    assert (run / "best" / "heads.safetensors").is_file()
    recs = records(run)
    assert any("val/acc" in r for r in recs)
    ce_rows = [r["train/ce_rows"] for r in recs if "train/ce_rows" in r]
    assert ce_rows and all(v == 8 * world for v in ce_rows)  # the loss sees the global batch


def run_ok(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = run_launcher(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_deepspeed_launcher_two_processes(tmp_path, launch_config):
    run_ok([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            "metric_ds/train.py", "--config", str(launch_config)])
    check_run(tmp_path, 2)


def test_torchrun_two_processes(tmp_path, launch_config):
    launch(launch_config, 2)
    check_run(tmp_path, 2)


def test_two_nodes_simulated_on_one_machine(tmp_path, launch_config):
    port = str(free_port())
    cmds = [[str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
             "--master_addr", "127.0.0.1", "--master_port", port, "-m", "metric_ds.train", "--config", str(launch_config)]
            for rank in (0, 1)]
    procs = [subprocess.Popen(c, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    check_run(tmp_path, 2)


def test_run_launcher_retries_only_the_native_abort(tmp_path):
    """A launch whose rank dies of the rare gloo abort runs once more on a fresh port, with a warning; any other
    failure is returned as it is, untried."""
    from conftest import NATIVE_ABORT

    marker = tmp_path / "tried"
    script = ("import os, sys, pathlib\n"
              f"m = pathlib.Path({str(marker)!r})\n"
              "if not m.exists():\n"
              "    m.write_text(sys.argv[2])\n"
              f"    sys.stderr.write({NATIVE_ABORT!r} + '\\n'); sys.stderr.flush(); os.abort()\n"
              "print('second', sys.argv[2])\n")
    with pytest.warns(UserWarning, match="launching once more"):
        proc = run_launcher([sys.executable, "-c", script, "--master_port", "1"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("second ")
    assert marker.read_text() == "1" and proc.stdout.split()[1] != "1"  # the retry got a fresh port

    fail = [sys.executable, "-c", "import sys; sys.stderr.write('other failure'); sys.exit(3)", "--master_port", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_launcher(fail, capture_output=True, text=True).returncode == 3
