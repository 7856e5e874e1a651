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
    real_step, real_add = trainer.step, trainer.bank.add_step_rows
    seen = {"micro": 0, "logged": 0, "log_step": False}

    def counted_step(batch, window_len, boundary, will_log):
        counter.active = not will_log  # a log step reads its window once, by design
        seen["micro"] += 1
        seen["logged"] += will_log
        seen["log_step"] = will_log
        try:
            return real_step(batch, window_len, boundary, will_log)
        finally:
            counter.active = False

    def counted_add(rows, step):  # the step's rows into the bank: part of the micro-batch's work
        counter.active = not seen["log_step"]
        try:
            return real_add(rows, step)
        finally:
            counter.active = False

    trainer.step = counted_step
    trainer.bank.add_step_rows = counted_add
    trainer.fit()
    assert seen["micro"] > seen["logged"] >= 1  # some micro-batches were counted
    assert not counter.calls, dict(counter.calls)
