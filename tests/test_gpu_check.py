"""scripts/gpu_check.sh --cpu-dry-run: the GPU check's steps at tiny sizes on CPU, so that the script is ready (and
green) the day a GPU is lent; and its budgets, which must fit the 6 minutes that leave room for a second run."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO

STEPS = ["1 env", "2 build", "3 tests", "4 nosync", "5 runs", "6 bench", "7 overhead", "8 memcheck"]
SKIPPED_ON_CPU = {"4 nosync", "8 memcheck"}  # the sync-debug tests need CUDA; no sanitizer in the dry run


def budgets(text: str) -> dict[str, int]:
    """Each step's budget in seconds, from the script's "budgets:" line."""
    line = next(x for x in text.splitlines() if x.startswith("budgets:"))
    return {m[0]: int(m[1]) for m in re.findall(r"(\d+ \w+) (\d+)s", line.split(";")[0])}


def test_the_budgets_fit_six_minutes():
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--budgets"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    got = budgets(out)
    assert list(got) == STEPS
    assert sum(got.values()) <= 360, out
    assert f"sum {sum(got.values())}s of 360s" in out


@pytest.mark.slow
def test_gpu_check_cpu_dry_run():
    # its own folder, not tmp_path: a long run can outlive pytest's numbered folders when other sessions start
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as out:
        check_dry_run(Path(out))


def check_dry_run(out: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=850)
    summary = (out / "summary.md").read_text()
    log_tail = (out / "log.txt").read_text()[-4000:] if (out / "log.txt").exists() else ""
    assert proc.returncode == 0, summary + "\n" + log_tail
    steps = [line for line in summary.splitlines() if line.startswith("- ")]
    assert [s.split(":")[0][2:] for s in steps] == STEPS
    assert all(": PASS (" in s for s in steps if s.split(":")[0][2:] not in SKIPPED_ON_CPU), summary
    assert all(": SKIP (" in s for s in steps if s.split(":")[0][2:] in SKIPPED_ON_CPU), summary
    assert sum(budgets(summary).values()) <= 360
    for name, seconds in budgets(summary).items():  # each step says its budget as it starts
        assert f"===== step {name} (budget {seconds}s, {seconds * 4}s in the dry run)" in proc.stdout
    log = (out / "log.txt").read_text()
    assert "runs ok: bf16 accumulated with dropout, save and resume" in log
    rows = (out / "supcon.csv").read_text().splitlines()
    assert {"fused", "reference", "gemm_bound"} <= {r.split(",")[1] for r in rows[1:]}
    results = json.loads((out / "overhead.json").read_text())["results"]
    assert {(r["impl"], r["zero"]) for r in results} == {("fused", 0), ("fused", 2)}
    assert all(r["ratio"] > 0 and r["trainer_samples_per_s"] > 0 for r in results)
    assert "| impl | ZeRO |" in summary  # the overhead table is appended to the summary
