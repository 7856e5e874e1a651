r"""The Supervised Contrastive loss, in plain PyTorch: the specification every other implementation matches.

This module is the one reference. Tests, benchmarks and the training loss (``impl="reference"``) import it;
nothing else re-implements the maths.

Definition (Khosla et al. 2020, the "L_out" form, without base-temperature rescaling). Let ``z`` be the
(m, d) contrast set, already L2-normalised, ``y`` its labels and :math:`\tau` the temperature. With
:math:`S_{ij} = z_i \cdot z_j / \tau`, for an anchor ``i``:

* :math:`A(i) = \{j \ne i\}` (every other row of the contrast set),
* :math:`P(i) = \{p \in A(i) : y_p = y_i\}` (the other rows with the same label),
* :math:`\ell_i = -\frac{1}{|P(i)|} \sum_{p \in P(i)} \big(S_{ip} - \operatorname{logsumexp}_{a \in A(i)} S_{ia}\big)`.

The loss is the mean of :math:`\ell_i` over the anchors with :math:`|P(i)| > 0`; anchors without a positive
are excluded (never NaN). When no anchor has a positive the loss is 0 and still part of the autograd graph.
Everything is computed in fp32 whatever the input dtype.

Anchors are the rows ``[anchor_start, anchor_start + anchor_count)`` of ``z``, so one rank can score its
own rows against a contrast set gathered from every rank; ``num_valid_global`` then replaces the local
number of valid anchors as the denominator.

The gradient, used by the fused op's backward, with :math:`L_i = \operatorname{lse}_{a \in A(i)} S_{ia}`,
:math:`w_i = g / N` for valid anchors (``g`` the upstream gradient, ``N`` the denominator) and 0 otherwise:

.. math::
    G_{ij} = w_i \big(e^{S_{ij} - L_i} - [j \in P(i)] / |P(i)|\big) \quad (j \ne i), \qquad
    \frac{\partial \mathcal{L}}{\partial z} \mathrel{+}= (G z + G^\top z_{\mathrm{anchor}}) / \tau .
"""
from __future__ import annotations

import torch

# A finite stand-in for -inf on the diagonal: exp() of it is exactly 0, and unlike -inf it never turns a
# zero upstream gradient into NaN for an anchor whose contrast set is empty (m == 1).
_MASKED = -1e30


def resolve_anchors(m: int, anchor_start: int, anchor_count: int | None) -> int:
    """Check the anchor slice against the contrast-set size and return the anchor count.

    Raises:
        ValueError: if the slice does not lie inside ``[0, m)``.
    """
    if anchor_count is None:
        anchor_count = m - anchor_start
    if anchor_start < 0 or anchor_count < 0 or anchor_start + anchor_count > m:
        raise ValueError(
            f"anchor slice [{anchor_start}, {anchor_start + anchor_count}) does not fit a contrast set of "
            f"{m} rows: need 0 <= anchor_start and anchor_start + anchor_count <= m"
        )
    return anchor_count


def positives_per_row(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """:math:`|P(i)|` for every row of a contrast set: how many other rows share its label.

    Args:
        labels: int64 class of each row, in ``[0, num_classes)``.
        num_classes: the number of classes where the caller knows it: the counts are then built with a
            fixed-size scatter, with no host-device synchronisation (``bincount`` must read the largest label).

    Shape:
        labels: (m,). Returns (m,) int64.
    """
    if labels.numel() == 0:
        return labels.new_zeros(0)
    if num_classes is None:
        per_class = torch.bincount(labels)
    else:
        per_class = labels.new_zeros(num_classes).index_add_(0, labels, torch.ones_like(labels))
    return per_class[labels] - 1


def check_labels(labels: torch.Tensor, num_classes: int | None) -> None:
    """Raise a clear error when a label lies outside ``[0, num_classes)``, where that costs no host sync.

    The check runs on CPU tensors only. On a GPU it would make the host wait for the device, and an out-of-range
    label would otherwise end in a device-side assert of ``index_add_``, which kills the CUDA context: so device
    labels must be checked before they move, on the CPU. metric_ds's training labels lie in range by construction
    (:meth:`metric_ds.data.labels.LabelMap.encode` refuses a label outside the map); a user of
    :func:`metric_ds.ops.supcon_loss` on a GPU
    who cannot vouch for the labels calls this on them while they are on the CPU, or passes ``num_classes=None``
    (the op then reads the largest label, one sync, and accepts any non-negative label).

    Raises:
        ValueError: a CPU label outside ``[0, num_classes)``, naming the range found and the fix.
    """
    if num_classes is None or labels.device.type != "cpu" or labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"SupCon labels must lie in [0, num_classes = {num_classes}), got labels in [{lo}, {hi}]: "
                         "encode the labels as class ids 0 .. num_classes - 1, or pass the right num_classes")


def supcon_loss_reference(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    anchor_start: int = 0,
    anchor_count: int | None = None,
    num_valid_global: int | torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SupCon loss, materialising the (anchors x m) similarity matrix. See the module docstring for the maths.

    Args:
        z: contrast set, L2-normalised.
        labels: integer class of each row of ``z``.
        temperature: :math:`\\tau > 0`.
        anchor_start: first anchor row.
        anchor_count: number of anchors; ``None`` means every row from ``anchor_start`` on.
        num_valid_global: denominator override (the number of valid anchors over all ranks).
        num_classes: labels lie in ``[0, num_classes)`` (checked on CPU tensors: :func:`check_labels`): the
            positive counts then need no ``bincount``, which waits for the device. ``None``: any labels >= 0.

    Shape:
        z: (m, d); labels: (m,).

    Returns:
        ``(loss, num_valid)``: the fp32 scalar loss and the int64 scalar count of local anchors with at
        least one positive.
    """
    if z.dim() != 2 or labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(f"expected z of shape (m, d) and labels of shape (m,), got {tuple(z.shape)} and "
                         f"{tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_labels(labels, num_classes)
    if torch.amp.is_autocast_available(z.device.type) and torch.is_autocast_enabled(z.device.type):
        # under torch.autocast the matmul below would run in bf16/fp16: the definition is fp32
        with torch.autocast(z.device.type, enabled=False):
            return supcon_loss_reference(z, labels, temperature, anchor_start, anchor_count, num_valid_global,
                                         num_classes=num_classes)
    m = z.shape[0]
    n = resolve_anchors(m, anchor_start, anchor_count)
    z32 = z.double() if z.dtype == torch.float64 else z.float()  # fp64 stays fp64 (gradcheck)
    za = z32[anchor_start:anchor_start + n]
    logits = za @ z32.T / temperature  # (n, m)
    rows = torch.arange(n, device=z.device)
    self_mask = torch.zeros(n, m, dtype=torch.bool, device=z.device)
    self_mask[rows, rows + anchor_start] = True
    logits = logits.masked_fill(self_mask, _MASKED)
    lse = torch.logsumexp(logits, dim=1)
    pos = (labels[anchor_start:anchor_start + n, None] == labels[None, :]) & ~self_mask
    num_pos = positives_per_row(labels, num_classes)[anchor_start:anchor_start + n]
    valid = num_pos > 0
    mean_pos_logit = (logits * pos).sum(dim=1) / num_pos.clamp_min(1)
    per_anchor = torch.where(valid, lse - mean_pos_logit, torch.zeros_like(lse))
    num_valid = valid.sum()
    denom = num_valid if num_valid_global is None else torch.as_tensor(num_valid_global, device=z.device)
    loss = per_anchor.sum() / denom.clamp_min(1).to(per_anchor.dtype)
    return loss, num_valid
