"""SupCon ops: the pure-PyTorch reference and the fused C++/CUDA op, behind one entry point.

``impl="reference"`` is the specification (:mod:`metric_ds.ops.reference`), ``"fused"`` the compiled op (an
error naming the reason and the fix where it is not built for the tensor's device, or where its self-check
fails: :mod:`metric_ds.ops.selfcheck`), and ``"auto"`` the fused op where it is available, passes its self-check
and is measured faster than the reference for the batch's size (:data:`AUTO_MIN_ROWS`), else the reference
(with one warning saying why when the op is missing or wrong, none when the batch is merely small).
"""
from __future__ import annotations

import warnings

import torch

from metric_ds.errors import EnvironmentProblem
from metric_ds.ops.reference import check_labels, resolve_anchors, supcon_loss_reference

IMPLS = ("auto", "fused", "reference")
_warned: set[object] = set()

# ``auto`` uses the reference when the contrast set has fewer rows than this (per device type), because the fused
# op was measured slower there; above it the fused op is faster and its memory stays linear in the batch. The
# timings behind each value: benchmarks/results/supcon_threshold_cpu.csv (docs/fused-op.md).
AUTO_MIN_ROWS: dict[str, int] = {
    "cpu": 512,
    # CUDA: not measured yet (no GPU has run this code): a conservative guess, below which the reference's B x B
    # matrices are small. scripts/gpu_check.sh measures the crossover; replace this with the measured B.
    "cuda": 1024,
}

__all__ = ["AUTO_MIN_ROWS", "IMPLS", "SupConLoss", "check_labels", "op_status", "supcon_loss",
           "supcon_loss_reference"]


def op_status() -> dict[str, object]:
    """Whether the fused op is available on CPU and on CUDA, and why not (for ``metric-ds env``)."""
    from metric_ds.ops import build, fused

    cpu_ok, cpu_why = fused.available("cpu")
    cuda_ok, cuda_why = fused.available("cuda")
    return {"cpu_available": cpu_ok, "cpu": cpu_why, "cuda_available": cuda_ok, "cuda": cuda_why,
            "cuda_build": build.cuda_build_decision()[1], "torch_cuda": torch.version.cuda or "none",
            "cuda_home": build.real_cuda_home() or "not found"}


def supcon_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    anchor_start: int = 0,
    anchor_count: int | None = None,
    num_valid_global: int | torch.Tensor | None = None,
    impl: str = "auto",
    *,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervised Contrastive loss (the maths: :mod:`metric_ds.ops.reference`).

    Args:
        z: the contrast set, L2-normalised (fp32, bf16 or fp16; accumulated in fp32).
        labels: int64 class of each row.
        temperature: tau > 0.
        anchor_start, anchor_count: the anchor rows ``[anchor_start, anchor_start + anchor_count)``
            (default: every row from ``anchor_start``).
        num_valid_global: denominator override (valid anchors over all ranks); a tensor keeps the call free of
            host-device synchronisation.
        impl: ``auto``, ``fused`` or ``reference``.
        num_classes: when the caller knows that every label lies in ``[0, num_classes)``: neither
            implementation then needs ``unique``, ``bincount`` or a read-back of the largest label, so the call
            never waits for the device. Checked where that is free, on CPU tensors (a ``ValueError``); on a GPU
            check labels on the CPU before they move (:func:`check_labels`), or an out-of-range label ends in a
            device-side assert. ``None`` (the default) accepts any int64 labels.

    Shape:
        z: (m, d); labels: (m,).

    Returns:
        ``(loss, num_valid)``: the scalar loss and the number of this call's anchors with a positive.

    Raises:
        ValueError: a label of CPU tensors outside ``[0, num_classes)``.
        EnvironmentProblem: ``impl="fused"`` where the op is not built for ``z``'s device or fails its
            self-check there.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto" and z.shape[0] < AUTO_MIN_ROWS.get(z.device.type, 0):
        impl = "reference"  # measured faster at this size: no warning, nothing is wrong
    if impl == "reference":
        return supcon_loss_reference(z, labels, temperature, anchor_start, anchor_count, num_valid_global,
                                     num_classes=num_classes)
    from metric_ds.ops import fused, selfcheck

    ok, why = fused.available(z.device.type)
    if ok:
        wrong = selfcheck.check(z.device, z.dtype)
        if wrong is not None:
            ok, why = False, f"its self-check against the reference failed on {z.device} {z.dtype}: {wrong}"
            warn_key: object = (z.device.type, z.device.index, z.dtype)
    else:
        warn_key = z.device.type
    if not ok:
        if impl == "fused":
            raise EnvironmentProblem(
                f"the fused SupCon op is not available for {z.device.type} tensors: {why}. Rebuild it with "
                "`make setup` (or `pip install --no-build-isolation -e .`), or use supcon_impl: reference")
        if warn_key not in _warned:
            _warned.add(warn_key)
            warnings.warn(f"fused SupCon op unavailable on {z.device.type} ({why}); using the PyTorch reference",
                          stacklevel=2)
        return supcon_loss_reference(z, labels, temperature, anchor_start, anchor_count, num_valid_global,
                                     num_classes=num_classes)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = resolve_anchors(z.shape[0], anchor_start, anchor_count)
    return fused.supcon_loss_fused(z, labels, temperature, anchor_start, n, num_valid_global,
                                   num_classes=num_classes)


class SupConLoss(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`supcon_loss`, for users who plug the op into their own training code as
    they would a pytorch-metric-learning loss (``loss_fn(z, labels)``). metric_ds's own loop calls
    :func:`supcon_loss` through :class:`metric_ds.losses.JointLoss`; this class is public API, not dead code.

    Args:
        temperature: tau.
        impl: ``auto``, ``fused`` or ``reference``.
        num_classes: labels lie in ``[0, num_classes)`` (see :func:`supcon_loss`); ``None``: any labels.
    """

    def __init__(self, temperature: float = 0.07, impl: str = "auto", num_classes: int | None = None):
        super().__init__()
        self.temperature, self.impl, self.num_classes = temperature, impl, num_classes

    def forward(self, z: torch.Tensor, labels: torch.Tensor, anchor_start: int = 0, anchor_count: int | None = None,
                num_valid_global: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return supcon_loss(z, labels, self.temperature, anchor_start, anchor_count, num_valid_global, self.impl,
                           num_classes=self.num_classes)
