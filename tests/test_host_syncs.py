"""No host-device synchronisation in a training micro-batch: counted on CPU by wrapping every Tensor method that
reads a value to the host, for calls made from metric_ds's own code (DeepSpeed's internals are not ours)."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

import metric_ds
from metric_ds.config import validate_config
from metric_ds.train import Trainer

PACKAGE = str(Path(metric_ds.__file__).resolve().parent)
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")


class SyncCounter:
    """Counts host reads of tensor values whose caller is a file of the metric_ds package."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: Counter[str] = Counter()
        self.active = False
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            if self.active:
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(PACKAGE):
                    self.calls[f"{name} at {Path(caller).name}:{sys._getframe(1).f_lineno}"] += 1
            return original(tensor, *args, **kwargs)
        return counted


@pytest.mark.parametrize("projection, accumulation", [(None, 1), (8, 2)])
def test_a_micro_batch_reads_nothing_to_the_host(tmp_path, tiny_model_dir, tiny_table, monkeypatch, projection,
                                                  accumulation):
    trainer = Trainer(validate_config(make_cfg(
        tmp_path, tiny_model_dir, tiny_table, training__max_steps=4, training__log_every_n_steps=100,
        training__gradient_accumulation_steps=accumulation, model__projection_dim=projection,
        training__supcon_impl="auto")))
    counter = SyncCounter(monkeypatch)
    real = trainer._train_micro_batch
    seen = {"micro": 0, "logged": 0}

    def counted_micro_batch(batch, window_len, boundary, will_log):
        counter.active = not will_log  # a log step reads its window once, by design
        seen["micro"] += 1
        seen["logged"] += will_log
        try:
            return real(batch, window_len, boundary, will_log)
        finally:
            counter.active = False

    trainer._train_micro_batch = counted_micro_batch
    trainer.fit()
    assert seen["micro"] > seen["logged"] >= 1  # some micro-batches were counted
    assert not counter.calls, dict(counter.calls)
