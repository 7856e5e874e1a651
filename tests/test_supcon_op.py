"""The fused SupCon op against the reference: sizes, labels, anchor slices, ties, temperatures, dtypes,
gradients (upstream != 1, non-contiguous inputs), gradcheck, opcheck and the impl dispatch."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import metric_ds.ops as ops
from conftest import aten_calls
from metric_ds.errors import EnvironmentProblem
from metric_ds.ops import SupConLoss, op_status, supcon_loss, supcon_loss_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_fused_cpu = pytest.mark.skipif(not op_status()["cpu_available"], reason="fused op not built for CPU")


def make(m: int, d: int, labels: str, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    if labels == "equal":
        y = torch.zeros(m, dtype=torch.long)
    elif labels == "distinct":
        y = torch.arange(m)
    else:
        y = torch.randint(0, int(labels), (m,), generator=g)
    return z.to(device=device, dtype=dtype), y.to(device)


def loss_and_grad(z, y, tau, impl, start=0, count=None, upstream=1.0, num_valid_global=None):
    z = z.detach().clone().requires_grad_()
    loss, nv = supcon_loss(z, y, tau, start, count, num_valid_global, impl=impl)
    (loss * upstream).backward()
    return loss.detach(), z.grad, nv


def assert_close_rel(a, b, rel, what, floor=None):
    """Max error <= rel x the reference's largest magnitude. Where the reference is exactly 0 (one positive that
    is also the only other row: loss and gradient cancel exactly), the scale is that of one logit's effect: 1 for
    the loss, 1 / (tau m) for a gradient entry."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    if floor is None:
        floor = 1.0 if what == "loss" else 1.0 / (0.07 * max(b.shape[0], 1))
    err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    assert err <= rel * max(scale, floor), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


GRID = [(m, d) for m in (1, 2, 3, 97, 1025) for d in (1, 59, 384)] + [(4099, 59), (1025, 768)] + [
    pytest.param(4099, d, marks=pytest.mark.slow) for d in (1, 384, 768)]  # the big corners


@needs_fused_cpu
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,d", GRID)
@pytest.mark.parametrize("labels", ["equal", "distinct", "2", "77"])
def test_matches_reference_fp32(device, m, d, labels):
    z, y = make(m, d, labels, device)
    ref = loss_and_grad(z, y, 0.07, "reference", upstream=1.7)
    got = loss_and_grad(z, y, 0.07, "fused", upstream=1.7)
    assert int(got[2]) == int(ref[2])
    try:
        assert_close_rel(got[0], ref[0], 1e-5, "loss")
        assert_close_rel(got[1], ref[1], 1e-5, "grad")
    except AssertionError:
        # Long fp32 sums (m = 4099, d = 1: all logits +-1/tau) put the reference itself ~1.5e-5 from the exact
        # value. Then the fp64 reference is truth and the fused op may be at most 2x as far from it as the fp32
        # reference is (the low-precision oracle below, applied to fp32).
        truth = loss_and_grad(z.double(), y, 0.07, "reference", upstream=1.7)
        for k in (0, 1):
            ref_err = float((ref[k].double() - truth[k]).abs().max())
            got_err = float((got[k].double() - truth[k]).abs().max())
            assert got_err <= max(2 * ref_err, 1e-5 * float(truth[k].abs().max())), (k, got_err, ref_err)


@needs_fused_cpu
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("m", [97, 2500])
def test_anchor_slices(device, where, m):
    z, y = make(m, 33, "5", device)
    count = m // 3
    start = {"start": 0, "middle": m // 3, "end": m - count}[where]
    ref = loss_and_grad(z, y, 0.1, "reference", start, count, upstream=-0.3, num_valid_global=m)
    got = loss_and_grad(z, y, 0.1, "fused", start, count, upstream=-0.3, num_valid_global=m)
    assert_close_rel(got[0], ref[0], 1e-5, "loss")
    assert_close_rel(got[1], ref[1], 1e-5, "grad")


@needs_fused_cpu
@pytest.mark.parametrize("tau", [0.01, 0.07, 1.0])
def test_ties_and_temperatures(tau):
    z, y = make(300, 16, "7")
    z = torch.cat([z, z[:50], z[:50]])  # duplicated rows: equal similarities everywhere
    y = torch.cat([y, y[:50], y[:50]])
    ref = loss_and_grad(z, y, tau, "reference")
    got = loss_and_grad(z, y, tau, "fused")
    assert_close_rel(got[0], ref[0], 1e-5, "loss")
    assert_close_rel(got[1], ref[1], 1e-5, "grad")


@needs_fused_cpu
def test_identical_rows_tiny_temperature_no_overflow():
    z = F.normalize(torch.ones(64, 8), dim=1)
    y = torch.arange(64) % 4
    loss, grad, _ = loss_and_grad(z, y, 0.01, "fused")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert float(loss) == pytest.approx(float(torch.log(torch.tensor(63.0))), rel=1e-5)


@pytest.mark.parametrize("impl", ["reference"] + (["fused"] if op_status()["cpu_available"] else []))
def test_no_positives_gives_zero_loss_and_grad(impl):
    z, y = make(50, 8, "distinct")
    z = z.requires_grad_()
    loss, nv = supcon_loss(z, y, 0.07, impl=impl)
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(nv) == 0
    assert loss.requires_grad is True or loss.grad_fn is not None
    assert torch.equal(z.grad, torch.zeros_like(z))


@needs_fused_cpu
def test_non_contiguous_inputs():
    z, y = make(400, 64, "9")
    zt = z.t().contiguous().t()  # same values, column-major
    ys = torch.stack([y, y], 1)[:, 0]  # strided labels
    assert not zt.is_contiguous() and not ys.is_contiguous()
    ref = loss_and_grad(z, y, 0.07, "reference", upstream=2.5)
    got = loss_and_grad(zt, ys, 0.07, "fused", upstream=2.5)
    assert_close_rel(got[0], ref[0], 1e-5, "loss")
    assert_close_rel(got[1], ref[1], 1e-5, "grad")


@needs_fused_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_reference_error(dtype):
    """flash-attention's oracle: fp32 reference is truth; the fused op's error in low precision may be at most
    2x the reference's own error in that precision."""
    z, y = make(257, 32, "5")
    truth = loss_and_grad(z, y, 0.1, "reference")
    z_low = z.to(dtype)
    ref_low = loss_and_grad(z_low, y, 0.1, "reference")
    fused_low = loss_and_grad(z_low, y, 0.1, "fused")
    for k in (0, 1):
        ref_err = float((ref_low[k].float() - truth[k]).abs().max())
        fused_err = float((fused_low[k].float() - truth[k]).abs().max())
        assert fused_err <= 2 * ref_err + 1e-6, (k, fused_err, ref_err)
    assert fused_low[1].dtype == dtype


@needs_fused_cpu
def test_symmetric_tiles_are_read_in_place(monkeypatch):
    """S_JI = S_IJ^T: an off-diagonal tile's columns serve the column block's rows where they lie (the epilogues'
    col_stats), with no transposed copy of the tile: 4 x 4 tiles copy no more than one tile does."""
    z, y = make(256, 16, "9")

    def copies(tile):
        monkeypatch.setenv("METRIC_DS_SUPCON_TILE", str(tile))
        calls = aten_calls(lambda: torch.ops.metric_ds.supcon_fwd(z, y, 0.1, 0, 256))
        return [(name, shapes) for name, shapes, _ in calls if name in ("aten::clone", "aten::copy_")]

    assert copies(64) == copies(256)


@needs_fused_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gemm_operands(monkeypatch, dtype):
    """The tile loop gives its GEMMs z in its own dtype, and, for bf16, the gradient weights G rounded to bf16
    (fp16 keeps them in fp32: they underflow its range), as it does on CUDA, where such a GEMM runs on tensor cores
    with fp32 accumulation and output. The CPU has no such GEMM: it upcasts each operand at the GEMM, which shows
    here as copies from z's dtype of tile-sized operands (none of the whole z feed a GEMM)."""
    monkeypatch.setenv("METRIC_DS_SUPCON_TILE", "32")
    m, d, tile = 96, 16, 32  # 3 row blocks: 6 tile pairs in the symmetric loop
    z, y = make(m, d, "5", dtype=dtype)
    low = {torch.bfloat16: "c10::BFloat16", torch.float16: "c10::Half"}[dtype]
    ops.fused.ensure_loaded()
    _, lse, num_pos = torch.ops.metric_ds.supcon_fwd(z, y, 0.1, 0, m)

    def upcasts(calls, shape):
        return sum(1 for name, shapes, types in calls
                   if name == "aten::copy_" and types[:2] == ["float", low] and shapes[1] == shape)

    fwd = aten_calls(lambda: torch.ops.metric_ds.supcon_fwd(z, y, 0.1, 0, m))
    assert upcasts(fwd, [tile, d]) == 6 and upcasts(fwd, [d, tile]) == 6  # both operands of each S tile
    bwd = aten_calls(lambda: torch.ops.metric_ds.supcon_bwd(torch.ones(m), z, y, lse, num_pos, 0.1, 0, m))
    weights_rounded = sum(1 for name, shapes, types in bwd
                          if name == "aten::copy_" and types[:2] == [low, "float"] and shapes[0] == [tile, tile])
    assert weights_rounded == (6 if dtype == torch.bfloat16 else 0)


@needs_fused_cpu
@pytest.mark.parametrize("start,count", [(0, None), (3, 5)])
def test_gradcheck_float64(start, count):
    z, y = make(13, 5, "3", dtype=torch.float64)
    z.requires_grad_()
    fn = lambda x: supcon_loss(x, y, 0.5, start, count, impl="fused")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6)


@needs_fused_cpu
def test_opcheck_both_ops():
    ops.fused.ensure_loaded()
    z, y = make(37, 6, "3")
    loss_rows, lse, num_pos = torch.ops.metric_ds.supcon_fwd(z, y, 0.1, 0, 37)
    torch.library.opcheck(torch.ops.metric_ds.supcon_fwd.default, (z.requires_grad_(), y, 0.1, 0, 37))
    torch.library.opcheck(torch.ops.metric_ds.supcon_fwd.default, (z.detach(), y, 0.1, 5, 20))
    g = torch.randn(37)
    torch.library.opcheck(torch.ops.metric_ds.supcon_bwd.default, (g, z.detach(), y, lse, num_pos, 0.1, 0, 37))


@needs_fused_cpu
def test_torch_compile_fullgraph():
    z, y = make(64, 8, "4")
    supcon_loss(z, y, 0.1, impl="fused")  # the availability check runs once, eagerly
    compiled = torch.compile(lambda a, b: supcon_loss(a, b, 0.1, impl="fused")[0], fullgraph=True, backend="eager")
    assert float(compiled(z, y)) == pytest.approx(float(supcon_loss_reference(z, y, 0.1)[0]), rel=1e-5)


def test_invalid_impl_lists_choices():
    z, y = make(4, 2, "2")
    with pytest.raises(ValueError, match="auto, fused, reference"):
        supcon_loss(z, y, 0.1, impl="fast")


def test_fused_unavailable_raises_and_auto_warns_once(monkeypatch):
    from metric_ds.ops import fused

    monkeypatch.setattr(fused, "available", lambda device: (False, "not built in this test"))
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(ops, "AUTO_MIN_ROWS", {})  # 20 rows would otherwise go to the reference silently
    z, y = make(20, 4, "3")
    with pytest.raises(EnvironmentProblem, match="not built in this test.*supcon_impl: reference"):
        supcon_loss(z, y, 0.1, impl="fused")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = supcon_loss(z, y, 0.1, impl="auto")[0]
        supcon_loss(z, y, 0.1, impl="auto")
    assert len([w for w in caught if "fused SupCon op unavailable" in str(w.message)]) == 1
    assert float(a) == pytest.approx(float(supcon_loss_reference(z, y, 0.1)[0]))


def test_module_wrapper():
    z, y = make(30, 4, "3")
    assert float(SupConLoss(0.2, impl="reference")(z, y)[0]) == pytest.approx(
        float(supcon_loss_reference(z, y, 0.2)[0]))


def test_meta_tensors_have_no_fused_kernel():
    z = torch.empty(8, 4, device="meta")
    with pytest.raises(EnvironmentProblem, match="meta"):
        supcon_loss(z, torch.zeros(8, dtype=torch.long, device="meta"), 0.1, impl="fused")


@pytest.mark.parametrize("impl", ["reference"] + (["fused"] if op_status()["cpu_available"] else []))
def test_autocast_does_not_lower_the_precision(impl):
    """Under torch.autocast (a bare training loop's bf16) the loss still accumulates in fp32: the fused op's tile
    matmuls and the reference's logits are not cast to bf16."""
    z, y = make(200, 32, "7")
    want = loss_and_grad(z, y, 0.07, "reference")
    leaf = z.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = supcon_loss(leaf, y, 0.07, impl=impl)[0]
    loss.backward()  # outside autocast, as torch recommends
    assert_close_rel(loss.detach(), want[0], 1e-5, "loss")
    assert_close_rel(leaf.grad, want[1], 1e-5, "grad")
