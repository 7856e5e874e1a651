"""Out-of-range labels: the SupCon op's Python entry refuses them on CPU tensors with a clear error (training's ids
come from ``LabelMap.encode``, which refuses a label outside the map, so they lie in range by construction) (on CUDA an out-of-range label would end in a device-side assert of ``index_add_``,
which kills the context)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metric_ds.ops import SupConLoss, fused, reference, supcon_loss

IMPLS = ["reference"] + (["fused"] if fused.available("cpu")[0] else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [-1, 3, 7])
def test_the_op_names_an_out_of_range_label(impl, bad):
    """A clear ValueError from the Python entry, whichever implementation, instead of an index error of the
    positive counts (or, on CUDA, a device-side assert)."""
    z = F.normalize(torch.randn(6, 4), dim=1)
    y = torch.tensor([0, 1, 2, 0, bad, 1])
    lo, hi = min(0, bad), max(2, bad)
    match = rf"labels must lie in \[0, num_classes = 3\), got labels in \[{lo}, {hi}\]"
    with pytest.raises(ValueError, match=match):
        supcon_loss(z, y, 0.1, impl=impl, num_classes=3)
    with pytest.raises(ValueError, match=match):
        SupConLoss(0.1, impl=impl, num_classes=3)(z, y)


def test_the_reference_with_num_classes_gives_the_same_numbers():
    """``num_classes`` only changes how the positives are counted (a fixed-size scatter, no bincount)."""
    torch.manual_seed(0)
    z = F.normalize(torch.randn(12, 5, dtype=torch.float64), dim=1)
    y = torch.randint(0, 4, (12,))
    for start, count in ((0, 12), (3, 5)):
        want = reference.supcon_loss_reference(z, y, 0.1, start, count)
        got = reference.supcon_loss_reference(z, y, 0.1, start, count, num_classes=4)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_check_labels_is_free_where_it_would_sync():
    """Nothing is read without ``num_classes``, or off the CPU (a meta tensor stands in for a device tensor)."""
    reference.check_labels(torch.tensor([5, -3]), None)
    reference.check_labels(torch.empty(3, dtype=torch.long, device="meta"), 2)
    reference.check_labels(torch.tensor([0, 1]), 2)
