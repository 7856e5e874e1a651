"""The fused op's self-check and ``auto``'s choice: a wrong or failing fused op is caught on first use (warn once and
use the reference under ``auto``, raise under ``fused``), per (device, dtype); small batches use the reference."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import metric_ds.ops as ops
from metric_ds.errors import EnvironmentProblem
from metric_ds.ops import fused, selfcheck, supcon_loss, supcon_loss_reference

pytestmark = pytest.mark.skipif(not ops.op_status()["cpu_available"], reason="fused op not built for CPU")

REAL = fused.supcon_loss_fused


def wrong_loss(*args, **kwargs):
    loss, nv = REAL(*args, **kwargs)
    return loss * 1.01, nv


def wrong_grad(z, *args, **kwargs):
    """The right loss value with a gradient that is off by 0.01 everywhere."""
    loss, nv = REAL(z, *args, **kwargs)
    extra = 0.01 * z.float().sum()
    return loss + (extra - extra.detach()), nv


def no_kernel_image(*args, **kwargs):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore lines")


def nan_loss(*args, **kwargs):
    loss, nv = REAL(*args, **kwargs)
    return loss * float("nan"), nv


@pytest.fixture
def fresh(monkeypatch):
    """No verdicts or warnings from earlier tests; every batch size goes to the fused op under ``auto``."""
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(ops, "AUTO_MIN_ROWS", {"cpu": 0, "cuda": 0})


def batch(m=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return F.normalize(torch.randn(m, 8, generator=g), dim=1).to(dtype), torch.randint(0, 4, (m,), generator=g)


def calls_of(monkeypatch, fn):
    """Route the fused op through ``fn`` and count the calls that do not come from the self-check."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return fn(*args, **kwargs)

    monkeypatch.setattr(fused, "supcon_loss_fused", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_real_op_passes(fresh, dtype):
    assert selfcheck.check(torch.device("cpu"), dtype) is None


@pytest.mark.parametrize("bad,reason", [
    (wrong_loss, "loss .* instead of the reference's"),
    (wrong_grad, "gradient off by"),
    (no_kernel_image, "it raised RuntimeError: CUDA error: no kernel image is available"),
    (nan_loss, "loss nan"),
])
def test_auto_warns_once_and_uses_the_reference(fresh, monkeypatch, bad, reason):
    monkeypatch.setattr(fused, "supcon_loss_fused", bad)
    z, y = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [supcon_loss(z, y, 0.1, impl="auto")[0] for _ in range(3)]
    messages = [str(w.message) for w in caught if "self-check" in str(w.message)]
    assert len(messages) == 1, messages
    assert "using the PyTorch reference" in messages[0]
    assert any(__import__("re").search(reason, m) for m in messages), messages
    want = supcon_loss_reference(z, y, 0.1)[0]
    assert all(float(g) == pytest.approx(float(want), rel=1e-6) for g in got)


@pytest.mark.parametrize("bad", [wrong_loss, wrong_grad, no_kernel_image])
def test_fused_raises_with_the_reason(fresh, monkeypatch, bad):
    monkeypatch.setattr(fused, "supcon_loss_fused", bad)
    z, y = batch()
    for _ in range(2):  # the verdict is kept: the second call raises too, without checking again
        with pytest.raises(EnvironmentProblem, match="self-check against the reference failed on cpu torch.float32"):
            supcon_loss(z, y, 0.1, impl="fused")


def test_verdict_is_per_dtype_and_checked_once(fresh, monkeypatch):
    runs = []
    real_run = selfcheck._run
    monkeypatch.setattr(selfcheck, "_run", lambda d, t: runs.append(t) or real_run(d, t))

    def wrong_in_bf16(z, *args, **kwargs):
        return (wrong_loss if z.dtype == torch.bfloat16 else REAL)(z, *args, **kwargs)

    calls = calls_of(monkeypatch, wrong_in_bf16)
    z, y = batch(m=33)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            supcon_loss(z, y, 0.1)
            supcon_loss(z.bfloat16(), y, 0.1)
    assert runs == [torch.float32, torch.bfloat16]  # one check per dtype, not per call
    assert calls.count(33) == 2  # the user's fp32 calls went to the fused op; the bf16 ones did not
    assert len([w for w in caught if "bfloat16" in str(w.message)]) == 1
    assert selfcheck._verdicts[("cpu", None, torch.float32)] is None


@pytest.mark.parametrize("m,impl,uses_fused", [
    (50, "auto", False),  # below the threshold: the reference, silently
    (150, "auto", True),
    (50, "fused", True),  # an explicit request is honoured at any size
])
def test_auto_threshold(fresh, monkeypatch, m, impl, uses_fused):
    monkeypatch.setattr(ops, "AUTO_MIN_ROWS", {"cpu": 100})
    monkeypatch.setattr(selfcheck, "_verdicts", {("cpu", None, torch.float32): None})
    calls = calls_of(monkeypatch, REAL)
    z, y = batch(m=m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = supcon_loss(z, y, 0.1, impl=impl)[0]
    assert (calls == [m]) == uses_fused
    assert float(loss) == pytest.approx(float(supcon_loss_reference(z, y, 0.1)[0]), rel=1e-5)


def test_check_runs_in_no_grad_and_inference_mode(fresh):
    z, y = batch()
    with torch.inference_mode():
        supcon_loss(z, y, 0.1, impl="fused")
    assert selfcheck._verdicts[("cpu", None, torch.float32)] is None


@pytest.mark.parametrize("num_classes", [4, 9])
def test_num_classes_matches_and_is_checked(num_classes):
    z, y = batch()
    a = supcon_loss(z.requires_grad_(), y, 0.1, impl="fused", num_classes=num_classes)[0]
    b = supcon_loss(z, y, 0.1, impl="fused")[0]
    assert float(a) == float(b)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes = 3\)"):
        supcon_loss(z, y, 0.1, impl="fused", num_classes=3)
