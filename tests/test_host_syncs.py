"""No host-device synchronisation in a training micro-batch, counted on CPU for calls made from metric_ds's own code
(DeepSpeed's internals are not ours): every Tensor method that reads a value to the host, and (:class:`DeviceSyncOps`)
every op whose output size or check needs the values of a device tensor (``nonzero``, boolean-mask indexing,
``bincount``, ...), and on a GPU, under ``torch.cuda.set_sync_debug_mode("error")``."""
from __future__ import annotations

import sys
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_cfg, make_label_free_frame
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import metric_ds
from metric_ds.config import validate_config
from metric_ds.ops import fused, selfcheck
from metric_ds.train import Trainer

PACKAGE = str(Path(metric_ds.__file__).resolve().parent)
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")
# Functions that read CPU tensors only (no sync on a GPU, where they return at once). view_inputs cuts the
# label-free rows' second view from the collated batch before it moves.
CPU_ONLY = {"check_labels", "view_inputs"}


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
                code = sys._getframe(1).f_code
                caller = code.co_filename
                if caller.startswith(PACKAGE) and code.co_name not in CPU_ONLY:
                    self.calls[f"{name} at {Path(caller).name}:{sys._getframe(1).f_lineno}"] += 1
            return original(tensor, *args, **kwargs)
        return counted


def _table(tmp_path: Path, tiny_table: Path, label_free: bool) -> Path:
    if not label_free:
        return tiny_table
    make_label_free_frame().to_parquet(tmp_path / "free.parquet")
    return tmp_path / "free.parquet"


@pytest.mark.parametrize("projection, accumulation, label_free", [(None, 1, False), (8, 2, False), (None, 1, True)])
def test_a_micro_batch_reads_nothing_to_the_host(tmp_path, tiny_model_dir, tiny_table, monkeypatch, projection,
                                                  accumulation, label_free):
    trainer = Trainer(validate_config(make_cfg(
        tmp_path, tiny_model_dir, _table(tmp_path, tiny_table, label_free), training__max_steps=4, training__log_every_n_steps=100,
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



# Ops that make the host wait for a CUDA device when they run on its tensors (their output size, or a check, needs
# the values): not syncs on CPU, so the reads counted above cannot see them.
SYNC_OPS = {torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere, torch.masked_select,
            torch.Tensor.masked_select, torch.bincount, torch.Tensor.bincount, torch.unique, torch.Tensor.unique,
            torch.unique_consecutive, torch.Tensor.unique_consecutive}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put, torch.Tensor.index_put_}
TORCH = str(Path(torch.__file__).resolve().parent)


def _is_move(func, args, kwargs) -> bool:
    return func is torch.Tensor.to and ("device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:]))


class DeviceSyncOps(TorchFunctionMode):
    """Records the calls of :data:`SYNC_OPS`, and boolean-mask indexing, on *device* tensors, made from the code
    under ``package`` (metric_ds's own), on CPU, where every tensor is a CPU tensor.

    A tensor is a *host* tensor when it is one of the collated batches' tensors before they move (:meth:`host`),
    or made by an op from host tensors only (or by a factory without ``device=``): on a GPU it would be on the CPU.
    Every other tensor (the model's, the bank's, a batch moved by ``Tensor.to(device)``, which on CPU returns the
    same tensor and is cloned here, so that the moved batch is a distinct tensor as on a GPU) is a device tensor.
    """

    def __init__(self, package: str = PACKAGE):
        super().__init__()
        self.package = package
        self.hosts: dict[int, weakref.ref] = {}
        self.calls: Counter[str] = Counter()

    def host(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.hosts[id(t)] = weakref.ref(t)

    def is_host(self, t: torch.Tensor) -> bool:
        ref = self.hosts.get(id(t))
        return ref is not None and ref() is t

    def _record(self, func, tensors) -> None:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH):
            frame = frame.f_back
        if frame is None or not frame.f_code.co_filename.startswith(self.package):
            return  # DeepSpeed's and transformers' internals are not ours
        if all(self.is_host(t) for t in tensors):
            return
        if func in INDEXING and not any(t.dtype in (torch.bool, torch.uint8) for t in tensors[1:]):
            return
        self.calls[f"{func.__name__} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}"] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in SYNC_OPS or func in INDEXING:
            self._record(func, tensors)
        out = func(*args, **kwargs)
        moved = _is_move(func, args, kwargs)
        if moved and out is args[0]:
            out = out.clone()
        if not moved and all(self.is_host(t) for t in tensors) and (tensors or "device" not in kwargs):
            self.host(tree_flatten(out)[0])
        return out


@pytest.mark.parametrize("mode, projection, accumulation, impl, label_free", [
    ("micro", None, 1, "auto", False), ("micro", 8, 2, "fused", False), ("accumulated", 8, 2, "auto", False),
    ("micro", 8, 1, "fused", True), ("accumulated", None, 2, "auto", True)])
def test_a_step_runs_no_syncing_op_on_device_tensors(tmp_path, tiny_model_dir, tiny_table, mode, projection,
                                                     accumulation, impl, label_free):
    """No ``nonzero``, ``masked_select``, boolean-mask index or ``bincount`` on a device tensor in a step or the
    bank's add: on a GPU each waits for the device. (The rows of each loss term, and the label-free rows' second
    view, come from the CPU batch.)"""
    trainer = Trainer(validate_config(make_cfg(
        tmp_path, tiny_model_dir, _table(tmp_path, tiny_table, label_free), training__max_steps=4, training__log_every_n_steps=2,
        training__gradient_accumulation_steps=accumulation, model__projection_dim=projection,
        training__supcon_impl=impl, training__contrastive_batch=mode)))
    if fused.available("cpu")[0]:  # the op's self-check reads its results, once per device and dtype: before
        selfcheck.check(torch.device("cpu"), torch.float32)
    watch = DeviceSyncOps()
    real_step, real_add = trainer.step, trainer.bank.add_step_rows
    seen = {"steps": 0}

    def watched_step(batch, window_len, boundary, will_log):
        watch.host(batch.values())  # the collated batch, on the CPU until the step moves it
        seen["steps"] += 1
        with watch:
            return real_step(batch, window_len, boundary, will_log)

    def watched_add(rows, step):
        with watch:
            return real_add(rows, step)

    trainer.step = watched_step
    trainer.bank.add_step_rows = watched_add
    trainer.fit()
    assert seen["steps"] >= 4
    assert not watch.calls, dict(watch.calls)


def _mask_rows(mask: torch.Tensor) -> torch.Tensor:
    return torch.arange(3)[mask]


def test_the_watch_tells_a_moved_batch_from_the_cpu_one():
    """The watch itself: a boolean-mask index and ``nonzero`` of the moved mask are counted, of the CPU mask not."""
    watch, mask = DeviceSyncOps(package=__file__), torch.tensor([True, False, True])
    watch.host([mask])
    with watch:
        _mask_rows(mask), mask.nonzero(), mask.long().bincount()
        assert not watch.calls
        moved = mask.to("cpu", non_blocking=True)
        _mask_rows(moved), moved.nonzero(), torch.bincount(moved.long())
    assert moved is not mask and sorted(k.split(" ")[0] for k in watch.calls) == [
        "__getitem__", "bincount", "nonzero"], dict(watch.calls)


def _raising_on_syncs(fn):
    """``fn`` run under ``torch.cuda.set_sync_debug_mode("error")``: any host-device sync inside raises."""
    def wrapped(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return wrapped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("mode", ["micro", "accumulated"])
def test_sync_debug_steps_make_no_host_sync_on_a_gpu(tmp_path, tiny_model_dir, tiny_table, monkeypatch, mode):
    """On a GPU, the steps' own work (the rows found and moved, the loss, the bank's add) raises on any sync.
    DeepSpeed's and the encoder's internals are not ours and run outside the check."""
    from metric_ds import steps

    trainer = Trainer(validate_config(make_cfg(
        tmp_path, tiny_model_dir, tiny_table, training__max_steps=4, training__log_every_n_steps=100,
        training__gradient_accumulation_steps=2, training__supcon_impl="auto", training__contrastive_batch=mode)))
    assert trainer.device.type == "cuda"
    calls = Counter()

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return _raising_on_syncs(call)

    monkeypatch.setattr(steps, "rows_and_batch", counted("rows", steps.rows_and_batch))
    trainer.loss_fn.forward = counted("loss", trainer.loss_fn.forward)
    trainer.bank.add_step_rows = counted("bank", trainer.bank.add_step_rows)
    trainer.fit()
    assert calls["rows"] >= 2 and calls["loss"] >= 2 and calls["bank"] >= 2, dict(calls)
