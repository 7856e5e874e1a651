"""Out-of-range labels: refused once per dataset by the data pipeline, and by the SupCon op's Python entry on
CPU tensors with a clear error (on CUDA an out-of-range label would end in a device-side assert of ``index_add_``,
which kills the context)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_frame

from metric_ds.data.labels import LabelMap
from metric_ds.data.pipeline import build_training_data
from metric_ds.errors import UserError
from metric_ds.ops import SupConLoss, fused, supcon_loss
from metric_ds.ops import reference

IMPLS = ["reference"] + (["fused"] if fused.available("cpu")[0] else [])


@pytest.mark.parametrize("shift", [-1, 1])
@pytest.mark.parametrize("with_val", [False, True])
def test_the_pipeline_refuses_label_ids_outside_the_classes(monkeypatch, shift, with_val):
    """A label id outside 0 .. C-1 (here made by a broken encoder) is a UserError naming the table and the row."""
    real = LabelMap.encode

    def broken(self, labels):
        ids = real(self, labels)
        ids[3] = -1 if shift < 0 else self.num_classes
        return ids

    monkeypatch.setattr(LabelMap, "encode", broken)
    df = make_frame()
    with pytest.raises(UserError, match=r"DataFrame: 1 row\(s\) have a label id outside 0 \.\. \d+ .* first at row 3"):
        build_training_data(df, val_frame=df.copy() if with_val else None, batch_size=4)


def test_the_pipeline_accepts_encoded_labels():
    data = build_training_data(make_frame(), batch_size=4)
    ids = np.concatenate([data.train["label_id"].to_numpy(), data.val["label_id"].to_numpy()])
    assert ids.min() >= 0 and ids.max() < data.label_map.num_classes


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
