"""The fused op against the reference on the GPU check's grid: fp32, bf16 and fp16; anchor slices; B up to 65,536;
a 64-wide tile so that tile edges are crossed; labels given with ``num_classes``.

``scripts/gpu_check.sh`` step 3 runs this file on CUDA. Without a GPU it is skipped, except when
``METRIC_DS_CHECK_DEVICE=cpu`` (the script's ``--cpu-dry-run``), which runs the same tests at small sizes on CPU
so that they cannot rot. ``METRIC_DS_CHECK_MAX_B`` caps the batch sizes (65,536 on CUDA, 1,100 on CPU).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from metric_ds.ops import op_status, supcon_loss, supcon_loss_reference
from metric_ds.ops.selfcheck import GRAD_TOL, LOSS_TOL

DEVICE = os.environ.get("METRIC_DS_CHECK_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
MAX_B = int(os.environ.get("METRIC_DS_CHECK_MAX_B", 65536 if DEVICE == "cuda" else 1100))
SIZES = [b for b in (97, 1031, 4099, 16384, 65536) if b <= MAX_B]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCE_CHUNK = 4096  # anchors per reference call: 4096 x 65536 fp32 logits are 1 GiB

pytestmark = pytest.mark.skipif(
    DEVICE is None or not op_status()[f"{DEVICE}_available"],
    reason="no GPU (METRIC_DS_CHECK_DEVICE=cpu runs this on CPU) or the fused op is not built for it")


def make(b: int, d: int, classes: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, classes, (b,), generator=g)
    return z.to(dtype).to(DEVICE), y.to(DEVICE)


def reference_in_chunks(z, y, tau, start, count, upstream):
    """The reference's loss and gradient for anchors [start, start + count), REFERENCE_CHUNK anchors at a time
    (the loss is a sum over anchors with one global denominator, so the chunks add up exactly)."""
    leaf = z.detach().clone().requires_grad_()
    counts = torch.bincount(y)
    num_valid = int((counts[y[start:start + count]] > 1).sum())
    total = torch.zeros((), dtype=torch.float64, device=z.device)
    for s in range(start, start + count, REFERENCE_CHUNK):
        n = min(REFERENCE_CHUNK, start + count - s)
        loss, _ = supcon_loss_reference(leaf, y, tau, s, n, num_valid_global=num_valid)
        (loss * upstream).backward()
        total += loss.detach().double()
    return total, leaf.grad, num_valid


def fused(z, y, tau, start, count, upstream, num_classes=None):
    leaf = z.detach().clone().requires_grad_()
    loss, num_valid = supcon_loss(leaf, y, tau, start, count, impl="fused", num_classes=num_classes)
    (loss * upstream).backward()
    return loss.detach().double(), leaf.grad, int(num_valid)


def assert_matches(got, want, dtype, what):
    loss_g, grad_g, _ = got
    loss_w, grad_w, _ = want
    loss_err = float((loss_g - loss_w).abs()) / max(float(loss_w.abs()), 1.0)
    assert loss_err <= LOSS_TOL, f"{what}: loss {float(loss_g)} vs {float(loss_w)}"
    assert grad_g.dtype == dtype and torch.isfinite(grad_g).all(), what
    scale = float(grad_w.double().abs().max())
    grad_err = float((grad_g.double() - grad_w.double()).abs().max()) / max(scale, 1e-12)
    assert grad_err <= GRAD_TOL[dtype], f"{what}: gradient off by {grad_err:.3g} of its largest entry"


@pytest.mark.parametrize("tile", [None, 64])
@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_whole_batch(monkeypatch, dtype, b, tile):
    if tile is not None:
        if b > 4099:
            pytest.skip("a 64-wide tile at this size takes minutes; smaller sizes cross the same edges")
        monkeypatch.setenv("METRIC_DS_SUPCON_TILE", str(tile))
    z, y = make(b, 96 if b > 4099 else 64, max(b // 16, 2), DTYPES[dtype])
    want = reference_in_chunks(z, y, 0.07, 0, b, upstream=1.7)
    got = fused(z, y, 0.07, 0, b, upstream=1.7)
    assert got[2] == want[2]
    assert_matches(got, want, DTYPES[dtype], f"B={b} {dtype} tile={tile}")


@pytest.mark.parametrize("tile", [None, 64])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_anchor_slices(monkeypatch, dtype, where, tile):
    if tile is not None:
        monkeypatch.setenv("METRIC_DS_SUPCON_TILE", str(tile))
    b = max(s for s in SIZES if s <= 4099)
    count = b // 3
    start = {"start": 0, "middle": b // 3, "end": b - count}[where]
    z, y = make(b, 48, 9, DTYPES[dtype], seed=1)
    want = reference_in_chunks(z, y, 0.1, start, count, upstream=-0.3)
    got = fused(z, y, 0.1, start, count, upstream=-0.3)
    assert_matches(got, want, DTYPES[dtype], f"anchors [{start}, {start + count}) of {b}, {dtype}")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_num_classes_gives_the_same_result(dtype):
    """The sync-free path (labels already 0..k-1, k given) against the one that remaps labels itself."""
    b = min(MAX_B, 1031)
    z, y = make(b, 32, 12, DTYPES[dtype], seed=2)
    plain = fused(z, y, 0.1, 0, b, upstream=1.0)
    given = fused(z, y, 0.1, 0, b, upstream=1.0, num_classes=12)
    # equal up to the order of CUDA's atomic adds into the per-class sums
    assert_matches(given, plain, DTYPES[dtype], "num_classes=12 against remapped labels")
    sliced = fused(z, y, 0.1, 5, b // 2, upstream=1.0, num_classes=20)  # unused classes are fine
    assert_matches(sliced, fused(z, y, 0.1, 5, b // 2, upstream=1.0), DTYPES[dtype], "num_classes with a slice")


@pytest.mark.skipif(DEVICE != "cuda", reason="tensor-core GEMMs are CUDA's (the CPU upcasts at the GEMM: "
                    "test_supcon_op.py::test_low_precision_gemm_operands checks the loop's side)")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_tile_gemms_read_the_input_dtype(monkeypatch, dtype):
    """On CUDA every similarity GEMM reads z as it is (bf16/fp16: tensor cores, fp32 output), the gradient GEMMs
    read bf16 weights for bf16 input (fp32 for fp16), and no tile operand is upcast on the way."""
    from conftest import aten_calls

    monkeypatch.setenv("METRIC_DS_SUPCON_TILE", "64")
    b, d = 200, 48
    z, y = make(b, d, 7, DTYPES[dtype])
    low = {"bf16": "c10::BFloat16", "fp16": "c10::Half"}[dtype]
    fused(z, y, 0.1, 0, b, upstream=1.0)  # the self-check's own matmuls run here, outside the profile
    calls = aten_calls(lambda: fused(z, y, 0.1, 0, b, upstream=1.0))
    # (operand shapes, operand dtypes) of every GEMM: mm(a, b); addmm_(out, a, b), the fp32 weights' in-place form
    first = {"aten::mm": 0, "aten::addmm_": 1, "aten::addmm": 1}
    mms = [(shapes[first[name]:first[name] + 2], types[first[name]:first[name] + 2])
           for name, shapes, types in calls if name in first]
    similarity = [types for shapes, types in mms if shapes[0][1] == d]
    gradient = [types for shapes, types in mms if shapes[0][1] != d]
    assert similarity and gradient, mms
    assert all(t == [low, low] for t in similarity), similarity
    weights = low if dtype == "bf16" else "float"
    assert all(t[0] == weights for t in gradient), gradient
    upcast = [shapes for name, shapes, types in calls
              if name == "aten::copy_" and types[:2] == ["float", low] and shapes[1][0] <= 64]
    assert not upcast, f"tile operands upcast to fp32: {upcast}"
