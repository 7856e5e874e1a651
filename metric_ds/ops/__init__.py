"""SupCon ops: the pure-PyTorch reference and (when built) the fused op, behind one entry point."""
from __future__ import annotations

import warnings

import torch

from metric_ds.errors import EnvironmentProblem
from metric_ds.ops.reference import supcon_loss_reference

IMPLS = ("auto", "fused", "reference")
_warned = False


def op_status() -> dict[str, object]:
    """Whether the fused op is available per device, and why not."""
    return {"cpu_available": False, "cuda_available": False, "reason": "the fused op is not built yet"}


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float, anchor_start: int = 0,
                anchor_count: int | None = None, num_valid_global: int | torch.Tensor | None = None,
                impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """SupCon loss (see :mod:`metric_ds.ops.reference` for the maths). Returns ``(loss, num_valid)``."""
    global _warned
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    status = op_status()
    if impl == "fused":
        raise EnvironmentProblem(f"supcon impl 'fused' is unavailable: {status['reason']}")
    if impl == "auto" and not _warned:
        warnings.warn(f"fused SupCon op unavailable ({status['reason']}); using the reference", stacklevel=2)
        _warned = True
    return supcon_loss_reference(z, labels, temperature, anchor_start, anchor_count, num_valid_global)


class SupConLoss(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`supcon_loss`."""

    def __init__(self, temperature: float = 0.07, impl: str = "auto"):
        super().__init__()
        self.temperature, self.impl = temperature, impl

    def forward(self, z, labels, **kwargs):
        return supcon_loss(z, labels, self.temperature, impl=self.impl, **kwargs)
