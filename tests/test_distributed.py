"""Cross-rank SupCon: W=2 ranks holding halves of a global batch take exactly the step of W=1 holding all of it.

Each case launches ``tests/dist_worker.py`` once alone and once under ``torchrun --nproc_per_node 2`` (gloo, CPU).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import BIN, launch_env, run_launcher

from metric_ds.distributed import free_port

WORKER = Path(__file__).resolve().parent / "dist_worker.py"

pytestmark = pytest.mark.slow


def launch(world: int, out: Path, model: Path, *extra: str) -> dict:
    args = [str(WORKER), "--model", str(model), "--out", str(out), *extra]
    if world == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(free_port()), *args]
    proc = run_launcher(cmd, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def assert_same_step(single: dict, multi: dict) -> None:
    a, b = single["terms"]["total"], multi["terms"]["total"]
    assert abs(a - b) <= 1e-6 * abs(a), (a, b)
    for key in ("ce", "supcon", "ce_rows", "metric_rows", "anchor_pos_frac"):
        assert multi["terms"][key] == pytest.approx(single["terms"][key], rel=1e-6, abs=1e-7), key
    for name, p in single["params"].items():
        q = multi["params"][name]
        # Tensor-relative; the floor covers parameters whose true gradient is 0 (attention key biases start at 0
        # and receive only rounding noise, ~1e-12).
        assert float((p - q).norm()) <= 1e-5 * float(p.norm()) + 1e-9, name


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_equal_one(tmp_path, tiny_model_dir, stage, impl):
    if impl == "fused":
        from metric_ds.ops import op_status

        if not op_status().get("cpu_available", False):
            pytest.skip("fused op not built for CPU")
    extra = ["--stage", str(stage), "--impl", impl, "--sizes", "5,7"]
    single = launch(1, tmp_path / "w1.pt", tiny_model_dir, *extra)
    multi = launch(2, tmp_path / "w2.pt", tiny_model_dir, *extra)
    assert_same_step(single, multi)


@pytest.mark.parametrize("impl, stage, label_free_from", [("reference", 0, 0), ("fused", 2, 0),
                                                           ("fused", 0, 5)])
def test_two_ranks_equal_one_with_label_free_rows(tmp_path, tiny_model_dir, impl, stage, label_free_from):
    """Each view is gathered with its row and the fresh class ids stay unique and paired over ranks; from row 5 on,
    rank 0 (rows 0-4) has no label-free row while rank 1 has."""
    extra = ["--stage", str(stage), "--impl", impl, "--sizes", "5,7", "--label-free-from", str(label_free_from)]
    single = launch(1, tmp_path / "w1.pt", tiny_model_dir, *extra)
    multi = launch(2, tmp_path / "w2.pt", tiny_model_dir, *extra)
    assert single["terms"]["contrastive_batch"] > single["terms"]["metric_rows"]  # the views are anchors too
    plain = launch(1, tmp_path / "p.pt", tiny_model_dir, "--stage", str(stage), "--impl", impl, "--sizes", "5,7")
    assert plain["terms"]["supcon"] != pytest.approx(single["terms"]["supcon"], rel=1e-3)
    assert_same_step(single, multi)


def test_rank_without_metric_rows(tmp_path, tiny_model_dir):
    extra = ["--stage", "0", "--sizes", "4,8", "--no-metric-rank0"]
    single = launch(1, tmp_path / "w1.pt", tiny_model_dir, *extra)
    multi = launch(2, tmp_path / "w2.pt", tiny_model_dir, *extra)
    assert single["terms"]["metric_rows"] < 12
    assert_same_step(single, multi)


def test_local_scope_differs_from_global(tmp_path, tiny_model_dir):
    """supcon_scope=local sees only the rank's own rows: a different (smaller-batch) loss."""
    glob = launch(2, tmp_path / "g.pt", tiny_model_dir, "--sizes", "6,6")
    local = launch(2, tmp_path / "l.pt", tiny_model_dir, "--sizes", "6,6", "--scope", "local")
    assert glob["terms"]["ce"] == pytest.approx(local["terms"]["ce"], rel=1e-6)
    assert glob["terms"]["supcon"] != pytest.approx(local["terms"]["supcon"], rel=1e-3)
