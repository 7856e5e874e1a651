"""Checkpoints: atomic periodic saves, the ``latest`` pointer, exact resume, and the ``best/`` export.

Layout under the run folder::

    checkpoints/step-N/ds/...                 DeepSpeed's model, optimizer and scheduler state
    checkpoints/step-N/client_state_rankR.pt  our state: step, epoch, position in the epoch, RNGs, bank, best so far
    checkpoints/latest                        the name of the newest complete checkpoint, written last
    best/                                     HF-format export of the best model so far

The samplers keep no state of their own: an epoch's order is a function of the seed and the epoch, so the
epoch and the position in it are enough to continue the same order. A save goes to ``checkpoints/.tmp-step-N`` and is renamed into place; ``latest`` moves only after that, so a
crash mid-save leaves the previous checkpoint usable. Our files are read with ``torch.load(weights_only=True)``
and so can hold only tensors and plain containers.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from metric_ds import distributed as D
from metric_ds.errors import UserError

LATEST = "latest"
DS_TAG = "ds"


def _barrier() -> None:
    if D.is_dist():
        dist.barrier()


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states (DeepSpeed saves none of them), in weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine: Any, run_dir: Path, step: int, client_state: dict[str, Any], keep_last: int) -> Path:
    """Save a resumable checkpoint atomically (a collective: every rank calls it).

    Args:
        engine: the DeepSpeed engine.
        run_dir: the run folder.
        step: global optimizer step (names the folder).
        client_state: our state; RNG states are added per rank.
        keep_last: how many periodic checkpoints to keep.

    Returns:
        The final checkpoint folder.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}"
    if D.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    state = dict(client_state, rng=rng_state(), world_size=D.world_size())
    torch.save(state, tmp / f"client_state_rank{D.rank()}.pt")
    _barrier()
    if D.is_main():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(ckpt_root / LATEST, final.name)
        _prune(ckpt_root, keep_last)
    _barrier()
    return final


def _prune(ckpt_root: Path, keep_last: int) -> None:
    steps = sorted(
        (int(p.name.split("-", 1)[1]), p) for p in ckpt_root.glob("step-*") if p.name.split("-", 1)[1].isdigit()
    )
    for _, path in steps[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(resume_from: str, run_dir: Path) -> Path:
    """Turn ``resume_from`` (``latest``, a run folder, a ``checkpoints`` folder or a ``step-N`` folder) into a
    checkpoint folder.

    Raises:
        UserError: if nothing resumable is there.
    """
    candidates = [Path(run_dir)] if resume_from == LATEST else [Path(resume_from)]
    for base in candidates:
        for root in (base / "checkpoints", base):
            pointer = root / LATEST
            if pointer.is_file():
                target = root / pointer.read_text().strip()
                if (target / DS_TAG).is_dir():
                    return target
        if (base / DS_TAG).is_dir():
            return base
    where = Path(run_dir) / "checkpoints" if resume_from == LATEST else Path(resume_from)
    raise UserError(
        f"training.resume_from: no checkpoint found at {where} (expected a run folder, its checkpoints/ folder "
        "with a 'latest' file, or a step-N folder). Remove resume_from to start afresh"
    )


def _deepspeed_safe_globals() -> list[type]:
    """The few DeepSpeed classes its checkpoints pickle (ZeRO stage enum, loss scalers, ZeRO fragment
    addresses): plain state holders."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class _WeightsOnlyLoads:
    """Make DeepSpeed's checkpoint engine read with ``torch.load(weights_only=True)`` (it passes False), allowing
    only :func:`_deepspeed_safe_globals`: no checkpoint file can run code when it is loaded."""

    def __init__(self, engine: Any):
        self.ckpt_engine = engine.checkpoint_engine

    def __enter__(self) -> None:
        original = self.ckpt_engine.load
        allowed = _deepspeed_safe_globals()

        def load(path: str, map_location: Any = None) -> Any:
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling refusal: say which file and why
                raise UserError(f"training.resume_from: {path} holds objects that a weights-only load refuses "
                                f"({str(exc).splitlines()[-1][:200]}); metric_ds does not run code from "
                                "checkpoints. Re-save it with this version of metric_ds") from None

        self._original = original
        self.ckpt_engine.load = load

    def __exit__(self, *exc: Any) -> None:
        self.ckpt_engine.load = self._original


def load_checkpoint(engine: Any, ckpt_dir: Path) -> dict[str, Any]:
    """Restore the engine (model, optimizer, scheduler) and return our client state (RNGs already restored).

    Every file is read with ``torch.load(weights_only=True)``: DeepSpeed's own files through
    :class:`_WeightsOnlyLoads`, ours directly.
    """
    ckpt_dir = Path(ckpt_dir)
    with _WeightsOnlyLoads(engine):
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=DS_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"training.resume_from: DeepSpeed could not load {ckpt_dir / DS_TAG}")
    own = ckpt_dir / f"client_state_rank{D.rank()}.pt"
    if not own.is_file():
        own = ckpt_dir / "client_state_rank0.pt"
    state = torch.load(own, map_location="cpu", weights_only=True)
    if state.get("world_size", 1) == D.world_size():
        set_rng_state(state["rng"])
    return state
