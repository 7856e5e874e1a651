"""A standing guard: a run killed with SIGKILL at random points, and resumed after each kill, ends with the
weights and validation records of the run that was never interrupted."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import launch_env, make_cfg, records

pytestmark = pytest.mark.slow

STEPS = 12
VOLATILE = ("samples_per_s", "step_time")  # wall-clock measurements


def _config(root: Path, model_dir: Path, table: Path) -> Path:
    data = make_cfg(root, model_dir, table, training__max_steps=STEPS, training__num_epochs=3,
                    training__eval_every_n_steps=2, checkpointing__save_every_n_batches=1,
                    checkpointing__keep_last_n_checkpoints=3)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _launch(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metric_ds.train", "--config", str(config), *extra],
                            env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _newest_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = run_dir / "checkpoints" / f"step-{STEPS}" / "ds"
    states = torch.load(next(ckpt.rglob("*model_states.pt")), map_location="cpu", weights_only=False)
    return states["module"]


def _val_records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(s in k for s in VOLATILE)} for r in records(run_dir)
            if "val/loss" in r]


def test_killed_and_resumed_three_times_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, tiny_table):
    rng = random.Random(20261125)
    calm = tmp_path / "calm"
    calm.mkdir()
    proc = _launch(_config(calm, tiny_model_dir, tiny_table))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    chaos = tmp_path / "chaos"
    chaos.mkdir()
    config = _config(chaos, tiny_model_dir, tiny_table)
    run_dir = chaos / "runs" / "t"
    kills = sorted(rng.sample(range(2, STEPS), 3))
    for i, at_step in enumerate(kills):
        proc = _launch(config, *(["--set", "training.resume_from=latest"] if i else []))
        deadline = time.monotonic() + 600
        while _newest_step(run_dir) < at_step and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # anywhere in the step: forward, save, validation, export
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    proc = _launch(config, "--set", "training.resume_from=latest")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    calm_dir = calm / "runs" / "t"
    assert _val_records(run_dir) == _val_records(calm_dir)
    expected = _final_weights(calm_dir)
    for name, tensor in _final_weights(run_dir).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    assert (run_dir / "best" / "heads.safetensors").is_file()
