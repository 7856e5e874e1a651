"""Label-free rows in the loss: SupCon with each label-free row its own class and its second view its positive
(SimCSE inside SupCon), label-free anchors weighted by ``label_free_weight`` inside the one mean; checked against a
plain PyTorch SimCSE + SupCon written here from the definition (not the project's reference), for both impls."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from metric_ds import ops
from metric_ds.data.labels import LABEL_FREE
from metric_ds.losses import JointLoss, RowIndex

TAU = 0.1


def _plain_weighted_supcon(z: torch.Tensor, y: torch.Tensor, free: torch.Tensor, w: float) -> torch.Tensor:
    """Khosla et al.'s L_out over the rows of ``z`` (labels ``y``), by the definition: for anchor i, A(i) = every
    other row, P(i) = the other rows of its label, l_i = -mean_{p in P(i)} (S_ip - logsumexp_{a in A(i)} S_ia); the
    loss is sum_i c_i l_i / sum_i c_i over anchors with a positive, c_i = w for label-free anchors (``free``), else 1."""
    z = z.double()
    total, count = z.new_zeros(()), 0.0
    for i in range(z.shape[0]):
        others = [j for j in range(z.shape[0]) if j != i]
        positives = [j for j in others if y[j] == y[i]]
        if not positives:
            continue
        s = torch.stack([z[i] @ z[j] / TAU for j in others])
        lse = torch.logsumexp(s, 0)
        ell = -torch.stack([z[i] @ z[p] / TAU - lse for p in positives]).mean()
        c = w if free[i] else 1.0
        total, count = total + c * ell, count + c
    return total / count


def _batch(seed: int = 0):
    """12 rows (classes 0..2, four of them label-free, two classifier-only), mixed in row order, and 4 views."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, LABEL_FREE, 1, 2, LABEL_FREE, 0, 1, LABEL_FREE, 2, 0, LABEL_FREE, 1])
    free = labels == LABEL_FREE
    metric = torch.ones(12, dtype=torch.bool)
    metric[[3, 8]] = False  # classifier-only rows
    classifier = ~free
    x = torch.randn(12, 6, generator=g, dtype=torch.float32, requires_grad=True)
    x_view = (x.detach()[free] + 0.1 * torch.randn(4, 6, generator=g)).requires_grad_()
    logits = torch.randn(12, 3, generator=g, requires_grad=True)
    return labels, metric, classifier, x, x_view, logits


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("w", [1.0, 0.3, 0.0])
def test_equals_a_plain_simcse_plus_supcon_loss_and_gradients(impl, w):
    labels, metric, classifier, x, x_view, logits = _batch()
    loss_fn = JointLoss(classification_loss_weight=0.5, metric_loss_weight=2.0, temperature=TAU, supcon_impl=impl,
                        num_classes=3, label_free_weight=w)
    terms = loss_fn(logits, F.normalize(x, dim=-1), labels, classifier, metric,
                    RowIndex.from_masks(classifier, metric, labels), z_view=F.normalize(x_view, dim=-1))
    got = torch.autograd.grad(terms.backward_loss, [x, x_view, logits])

    # the plain form: labelled metric rows, label-free rows and their views, each row and its view a fresh class
    xs, xv, lg = (t.detach().double().requires_grad_() for t in (x, x_view, logits))
    free = labels == LABEL_FREE
    lab = metric & ~free
    fresh = torch.arange(4) + 100
    z = torch.cat([F.normalize(xs[lab], dim=-1), F.normalize(xs[free], dim=-1), F.normalize(xv, dim=-1)])
    y = torch.cat([labels[lab], fresh, fresh])
    is_free = torch.cat([torch.zeros(int(lab.sum()), dtype=torch.bool), torch.ones(8, dtype=torch.bool)])
    ce = F.cross_entropy(lg[classifier], labels[classifier])  # label-free rows take no part
    want = 0.5 * ce + 2.0 * _plain_weighted_supcon(z, y, is_free, w)
    want_grads = torch.autograd.grad(want, [xs, xv, lg])

    torch.testing.assert_close(terms.backward_loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for g, e, name in zip(got, want_grads, ("x", "x_view", "logits")):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6, msg=name)
    with_pos, pos_sum = terms.shares[2:].tolist()
    assert with_pos == 6 + 8 and pos_sum == 6 * 2 + 8 and terms.counts.contrast_rows == 14  # 4 free + 4 views
    assert terms.counts.metric_sizes == [6] and terms.counts.free_sizes == [4]


def test_label_free_rows_never_reach_ce_and_the_bank_gets_labelled_rows_only():
    labels, metric, classifier, x, x_view, logits = _batch()
    z = F.normalize(x, dim=-1)
    terms = JointLoss(num_classes=3, supcon_impl="reference")(
        logits, z, labels, classifier, metric, z_view=F.normalize(x_view, dim=-1))
    lab = metric & (labels != LABEL_FREE)
    assert torch.equal(terms.contrast.labels, labels[lab]) and torch.equal(terms.contrast.z, z[lab].detach())
    assert terms.contrast.anchor_start == 0 and terms.contrast.anchor_count == 6
    torch.testing.assert_close(terms.shares[0], F.cross_entropy(logits[classifier], labels[classifier]).detach())


def test_a_batch_without_label_free_rows_computes_as_before_bit_for_bit():
    """The path of labelled rows is the op called once on the metric rows with the global valid-anchor count."""
    labels, metric, classifier, x, _, logits = _batch()
    labels = labels.clamp_min(0)  # no label-free row
    z = F.normalize(x, dim=-1)
    loss_fn = JointLoss(classification_loss_weight=0.0, num_classes=3, supcon_impl="reference")
    terms = loss_fn(logits, z, labels, classifier, metric, RowIndex.from_masks(classifier, metric, labels))
    m = metric.nonzero().squeeze(1)
    with_pos = (ops.reference.positives_per_row(labels[m], 3) > 0).sum()
    want, _ = ops.supcon_loss(z[m], labels[m], 0.07, 0, len(m), with_pos, impl="reference", num_classes=3)
    assert torch.equal(terms.backward_loss, want) and terms.counts.free_sizes == [0]
    assert torch.equal(RowIndex.from_masks(classifier, metric, labels).metric, metric.nonzero().squeeze(1))


def test_label_free_rows_need_their_views_and_num_classes():
    labels, metric, classifier, x, x_view, logits = _batch()
    z = F.normalize(x, dim=-1)
    with pytest.raises(ValueError, match="need z_view"):
        JointLoss(num_classes=3)(logits, z, labels, classifier, metric)
    with pytest.raises(ValueError, match="needs num_classes"):
        JointLoss()(logits, z, labels, classifier, metric, z_view=F.normalize(x_view, dim=-1))


def test_zero3_on_several_processes_is_refused_with_label_free_rows_only():
    from metric_ds.errors import UserError
    from metric_ds.views import check_views_supported

    train = pd.DataFrame({"label_id": [0, 1, LABEL_FREE]})
    with pytest.raises(UserError, match="1 label-free row.*deepspeed.zero_stage is 3 on 2 processes"):
        check_views_supported(train, 3, 2)
    check_views_supported(train, 3, 1)
    check_views_supported(train, 2, 2)
    check_views_supported(train.iloc[:2], 3, 2)
