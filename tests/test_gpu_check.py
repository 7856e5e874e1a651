"""scripts/gpu_check.sh --cpu-dry-run: the GPU check's six steps at tiny sizes on CPU, so that the script is
ready (and green) the day a GPU is lent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO


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
    assert [s.split(":")[0] for s in steps] == ["- 1 env", "- 2 build", "- 3 tests", "- 4 sanitizer", "- 5 bench",
                                                "- 6 train"]
    assert all(": PASS (" in s for s in steps if "sanitizer" not in s), summary
    assert ": SKIP (" in steps[3]
    rows = (out / "supcon.csv").read_text().splitlines()
    assert {"fused", "reference", "gemm_bound"} <= {r.split(",")[1] for r in rows[1:]}
    results = json.loads((out / "overhead.json").read_text())["results"]
    assert {(r["impl"], r["zero"]) for r in results} == {("fused", 0), ("fused", 2)}
    assert all(r["ratio"] > 0 and r["trainer_samples_per_s"] > 0 for r in results)
    assert "| impl | ZeRO |" in summary  # the overhead table is appended to the summary
