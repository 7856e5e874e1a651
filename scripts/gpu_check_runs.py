"""scripts/gpu_check.sh's step "runs": short real trainings of a tiny random BERT (dropout 0.1) on the device.

* bf16, ``contrastive_batch: accumulated`` (two micro-batches per step: the second forward must replay the first's
  dropout, so the CUDA RNG is restored), 4 steps straight;
* the same run saved at step 2 and resumed from ``latest`` to step 4: its last loss must match the straight run's
  (within the rounding of bf16 and the GPU's atomics);
* one fp16 run of 2 steps (CUDA only: the CPU dry run says so and skips it).

Each run is ``metric-ds train`` in its own process, two at a time. Exit status 1 when one fails or disagrees.

    python scripts/gpu_check_runs.py --device cuda --workdir /tmp/runs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

RESUME_RTOL = 0.05  # bf16 weights and non-deterministic GPU reductions: close, not bit for bit


def write_config(workdir: Path, name: str, model_dir: Path, table: Path, checkpointing: dict | None = None,
                 **training: object) -> Path:
    """A tiny run's YAML (``name.yaml``): batch 8, length 16, the fused op, a fixed 4-step linear schedule."""
    cfg = {
        "run_name": name, "model_name": str(model_dir),
        "data": {"train_path": str(table), "val_ratio": 0.1},
        "training": {"batch_size": 8, "num_epochs": 1, "max_seq_length": 16, "supcon_impl": "fused",
                     "log_every_n_steps": 1, "seed": 0, "mixed_precision": "bf16",
                     "gradient_accumulation_steps": 2, "contrastive_batch": "accumulated", "max_steps": 4,
                     **training},
        "scheduler": {"num_training_steps": 4},  # the same lr whether a run stops at 2 and resumes or not
        "checkpointing": {"checkpoints_dir": str(workdir / "runs"), "save_best_by": "loss", **(checkpointing or {})},
        "logging": {"backends": ["jsonl"], "progress": "off"},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_all(configs: list[Path]) -> None:
    """``metric-ds train`` on each config, all at once; raises naming the ones that failed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [(c, subprocess.Popen([sys.executable, "-m", "metric_ds.cli", "train", "--config", str(c)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for c in configs]
    failed = []
    for cfg, proc in procs:
        out = proc.communicate()[0]
        print(f"--- {cfg.name}: exit {proc.returncode}\n" + "\n".join(out.strip().splitlines()[-15:]), flush=True)
        if proc.returncode != 0:
            failed.append(cfg.name)
    if failed:
        raise SystemExit(f"training failed: {', '.join(failed)}")


def losses(run_dir: Path) -> dict[int, float]:
    """The logged training loss of each optimizer step."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--workdir", required=True)
    args = p.parse_args(argv)
    from bench_overhead import prepare

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, table = prepare(workdir, "tiny", 16, rows=160)
    runs = workdir / "runs"
    straight = write_config(workdir, "straight", model_dir, table)
    first = write_config(workdir, "resumed", model_dir, table, {"save_every_n_batches": 2}, max_steps=2)
    train_all([straight, first])
    again = write_config(workdir, "resumed", model_dir, table, {"save_every_n_batches": 2}, resume_from="latest")
    second = [again]
    if args.device == "cuda":
        second.append(write_config(workdir, "fp16", model_dir, table, None, mixed_precision="fp16", max_steps=2,
                                   contrastive_batch="micro"))
    else:
        print("fp16: needs CUDA, not run in the CPU dry run")
    train_all(second)
    want, got = losses(runs / "straight"), losses(runs / "resumed")
    print(f"straight run's losses: {want}\nsaved at 2 and resumed: {got}")
    if sorted(got) != sorted(want) or not all(math.isfinite(v) for v in got.values()):
        raise SystemExit("the resumed run did not log the straight run's steps with finite losses")
    if not math.isclose(got[4], want[4], rel_tol=RESUME_RTOL):
        raise SystemExit(f"after resume, step 4's loss is {got[4]:.6g} instead of {want[4]:.6g}")
    print("runs ok: bf16 accumulated with dropout, save and resume" + (", fp16" if args.device == "cuda" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
