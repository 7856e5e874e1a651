"""The fused op's self-check: does it compute the reference's loss and gradient on this (device, dtype)?

An op that is registered for a device may still not run there (a GPU newer than the architectures it was built
for: "no kernel image is available"), or run and be wrong (a compiler or driver bug on hardware nobody here has
tried). So the first time the fused op would be used on a (device type, device index, dtype), it runs on a small
random batch (70 rows, both the whole-set and the anchor-slice paths, a few milliseconds) and is compared with
:mod:`metric_ds.ops.reference`, with TF32 off (:mod:`metric_ds.ops.precision`). The verdict is kept for the
life of the process.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from metric_ds.ops.precision import ieee_fp32_matmuls
from metric_ds.ops.reference import supcon_loss_reference

# Largest error allowed, relative to the reference's largest magnitude (at least 1 for the loss). The fused op
# accumulates in fp32 like the reference, so the loss agrees to fp32 rounding whatever the input dtype; its
# gradient is returned in the input dtype (and, for bf16, its softmax weights are rounded to bf16 before their
# GEMMs), so a low-precision gradient may differ by a few units in the last place.
# A broken kernel is off by O(1).
LOSS_TOL = 1e-4
GRAD_TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
_ROWS, _DIM, _CLASSES, _TAU = 70, 24, 6, 0.1
_SLICES = ((0, _ROWS), (10, 40))  # every row an anchor (the symmetric tile path), and an anchor slice

_verdicts: dict[tuple[str, int | None, torch.dtype], str | None] = {}


def check(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when the fused op matches the reference on ``(device, dtype)``, else the reason (memoised).

    Under ``torch.compile`` tracing an unchecked pair is not checked (it cannot run inside a trace) and counts
    as passed; an eager call first, as in training, checks it.
    """
    if torch.compiler.is_compiling():
        return None
    key = (device.type, device.index, dtype)
    if key not in _verdicts:
        _verdicts[key] = _run(device, dtype)
    return _verdicts[key]


def _relative_error(got: torch.Tensor, want: torch.Tensor, floor: float) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max()) / max(float(want.abs().max()), floor)


def _run(device: torch.device, dtype: torch.dtype) -> str | None:
    from metric_ds.ops import fused  # through the module, so that tests can swap the function

    try:
        # Inside the context even the inputs: made under an outer inference_mode they could not enter autograd.
        # TF32 off too (restored after): under TF32 a correct op and the reference round apart by more than LOSS_TOL.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
                ieee_fp32_matmuls(force=True):
            g = torch.Generator().manual_seed(20240611)
            z64 = F.normalize(torch.randn(_ROWS, _DIM, generator=g, dtype=torch.float64), dim=1)
            labels = torch.randint(0, _CLASSES, (_ROWS,), generator=g).to(device)
            z = z64.to(dtype).to(device)
            for start, count in _SLICES:
                results = []
                for fn in (fused.supcon_loss_fused, supcon_loss_reference):
                    leaf = z.detach().clone().requires_grad_()
                    loss, num_valid = fn(leaf, labels, _TAU, start, count, None)
                    (loss * 1.7).backward()
                    results.append((loss, int(num_valid), leaf.grad))
                (loss_f, valid_f, grad_f), (loss_r, valid_r, grad_r) = results
                where = f"{_ROWS} rows, anchors [{start}, {start + count})"
                if valid_f != valid_r:
                    return f"{valid_f} valid anchors instead of the reference's {valid_r} ({where})"
                loss_err = _relative_error(loss_f, loss_r, 1.0)
                if not loss_err <= LOSS_TOL:
                    return (f"loss {float(loss_f):.6g} instead of the reference's {float(loss_r):.6g} "
                            f"(relative error {loss_err:.2g} > {LOSS_TOL:g}; {where})")
                tol = GRAD_TOL.get(dtype, 1e-2)
                grad_err = _relative_error(grad_f, grad_r, 1e-3)
                if not grad_err <= tol:
                    return f"gradient off by {grad_err:.2g} of its largest entry (> {tol:g}; {where})"
    except Exception as exc:  # noqa: BLE001 - any failure (e.g. "no kernel image is available") is the reason
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return f"it raised {type(exc).__name__}: {first}"
    return None
