"""``training.contrastive_batch: accumulated``: CE and SupCon over every row of an optimizer step, with the memory
of one micro-batch (gradient caching, as in GradCache, Gao et al. 2021, extended to a label-dependent loss).

One accumulation window of micro-batches (on every rank, with ``supcon_scope: global``) takes three passes:

1. a forward of each micro-batch without gradients, keeping only ``z``, the logits and ``h`` (the RNG state
   before each forward is saved), and of the second view of its label-free rows, keeping ``z``
   (:mod:`metric_ds.views`);
2. the joint loss over the whole window's rows, and its gradients with respect to the cached ``z`` and logits;
3. a second forward of each micro-batch (and of its view: the RNG draws follow in the same order), with its RNG
   state restored so that dropout draws the same masks, and a backward of ``<z, dL/dz> + <logits, dL/dlogits>``
   (``+ <z_view, dL/dz_view>``), which gives each parameter exactly its share of dL/dθ.

The sum over micro-batches is the gradient of one micro-batch holding every row of the window: exact in fp32 up to
summation order (the same forward is computed twice, deterministically on CPU). Under bf16/fp16 the cached
gradients are fp32, the two forwards are the same low-precision computation, so the result is within that
precision's rounding of the one-batch gradient (on GPUs, kernels that are not deterministic make the two forwards
differ by rounding too). The encoder's activations are held for one micro-batch at a time; the loss itself is
memory-linear through the fused op. The cost is a second forward of every micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metric_ds.losses import JointLoss, LossTerms, RowIndex
from metric_ds.model import model_inputs
from metric_ds.views import forward_view


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class WindowResult:
    """What one accumulated window gives the loop: its loss terms (over all its rows), and its rows' pooled ``h``
    for the bank."""

    terms: LossTerms
    h: torch.Tensor


def accumulated_step(engine: Any, loss_fn: JointLoss, batches: list[dict[str, torch.Tensor]],
                     before_step: Any = None, rows: RowIndex | None = None,
                     views: list[dict[str, torch.Tensor] | None] | None = None) -> WindowResult:
    """Train one window of micro-batches with the contrastive batch spanning all of them (see the module).

    Args:
        engine: the DeepSpeed engine (its module returns :class:`~metric_ds.model.ModelOutput`).
        loss_fn: the joint loss.
        batches: the window's collated micro-batches, already on the engine's device.
        before_step: called with no arguments after the last backward and before the optimizer step (the loop
            reads the pre-clipping gradient norm there).
        rows: the row indices of the window's concatenated masks, found on the CPU (see
            :class:`~metric_ds.losses.RowIndex`); ``None``: found from the device masks (a host sync on a GPU).
        views: each micro-batch's second view of its label-free rows (:func:`metric_ds.views.view_inputs`), None
            for a micro-batch without them; ``None``: no micro-batch has label-free rows.

    Returns:
        The window's loss terms and the ``h`` of its rows.
    """
    device = engine.device
    views = views or [None] * len(batches)
    states, zs, logits, hs, z_views = [], [], [], [], []
    with torch.no_grad():
        for batch, view in zip(batches, views):
            states.append(_rng_state(device))
            out = engine(**model_inputs(batch))
            zs.append(out.z)
            logits.append(out.logits.float())
            hs.append(out.h)
            if view is not None:
                z_views.append(forward_view(engine, view))
    z = torch.cat(zs).requires_grad_()
    logit = torch.cat(logits).requires_grad_()
    z_view = torch.cat(z_views).requires_grad_() if z_views else None
    cat = {k: torch.cat([b[k] for b in batches]) for k in ("labels", "classifier_mask", "metric_mask")}
    terms = loss_fn(logit, z, cat["labels"], cat["classifier_mask"], cat["metric_mask"], rows, z_view=z_view)
    wrt = [z, logit] + ([z_view] if z_view is not None else [])
    grad_z, grad_logits, *grad_view = torch.autograd.grad(terms.backward_loss, wrt, allow_unused=True,
                                                          materialize_grads=True)
    sizes = [b["labels"].shape[0] for b in batches]
    view_grads = iter(grad_view[0].split([v.shape[0] for v in z_views]) if grad_view else [])
    end_state = _rng_state(device)
    for i, (batch, gz, gl) in enumerate(zip(batches, grad_z.split(sizes), grad_logits.split(sizes))):
        last = i == len(batches) - 1
        engine.set_gradient_accumulation_boundary(last)
        _set_rng_state(states[i], device)
        out = engine(**model_inputs(batch))
        surrogate = (out.z * gz).sum() + (out.logits.float() * gl).sum()
        if views[i] is not None:
            surrogate = surrogate + (forward_view(engine, views[i]) * next(view_grads)).sum()
        # The cached gradients are already those of the window's loss (scaled for the ranks): no 1/GA here.
        engine.backward(surrogate, scale_wrt_gas=False)
        if last and before_step is not None:
            before_step()
        engine.step()
    _set_rng_state(end_state, device)
    return WindowResult(terms, torch.cat(hs))
