"""Checkpoints: atomic periodic saves, the ``latest`` pointer, exact resume, and the ``best/`` export.

Layout under the run folder::

    checkpoints/step-N/ds/...                 DeepSpeed's model, optimizer and scheduler state
    checkpoints/step-N/client_state_rankR.pt  our state: step, epoch, position in the epoch, RNGs, bank, best so far
    checkpoints/step-N/manifest.json          size and sha256 of every file above, written last
    checkpoints/latest                        the name of the newest complete checkpoint, written last
    best/                                     HF-format export of the best model so far

The samplers keep no state of their own: an epoch's order is a function of the seed and the epoch, so the
epoch and the position in it are enough to continue the same order. A save goes to ``checkpoints/.tmp-step-N`` and is renamed into place; ``latest`` moves only after that, so a
crash mid-save leaves the previous checkpoint usable. Our files are read with ``torch.load(weights_only=True)``
and so can hold only tensors and plain containers.

Before a checkpoint is loaded, every file is checked against its manifest: a checkpoint with a missing,
truncated or altered file is refused, naming the file. ``resume_from: latest`` then falls back to the newest
checkpoint that verifies, with a warning; an explicit checkpoint path is an error that names the previous
complete checkpoint. A failed save (a full disk, a lost mount) is an error that names the checkpoint and the
cause, removes the partial folder and leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from metric_ds import distributed as D
from metric_ds.errors import UserError, describe_io_error

LATEST = "latest"
DS_TAG = "ds"
MANIFEST = "manifest.json"
UNIVERSAL_TAG = "ds_universal"  # DeepSpeed's state converted for any world size, made on demand beside ds/
_UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}


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
    try:
        if D.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        # the marker DeepSpeed's universal-checkpoint converter needs, to resume on another world size
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, client_state=_UNIVERSAL_INFO)
        state = dict(client_state, rng=rng_state(), world_size=D.world_size())
        torch.save(state, tmp / f"client_state_rank{D.rank()}.pt")
        _barrier()
        if D.is_main():
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(ckpt_root / LATEST, final.name)
            _prune(ckpt_root, keep_last)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not _looks_like_io(exc):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = (ckpt_root / LATEST).read_text().strip() if (ckpt_root / LATEST).is_file() else None
        intact = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise UserError(f"could not save checkpoint {final.name} to {ckpt_root}: {describe_io_error(exc, ckpt_root)} "
                        f"({intact})") from None
    _barrier()
    return final


def _looks_like_io(exc: RuntimeError) -> bool:
    """torch.save reports a failed write (a full disk) as a RuntimeError such as 'unexpected pos N vs M'."""
    text = str(exc).lower()
    return any(s in text for s in ("unexpected pos", "file write failed", "no space", "write failed"))


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file under ``folder`` in ``folder/manifest.json``."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def verify_checkpoint(folder: Path) -> str | None:
    """Why the checkpoint in ``folder`` must not be loaded (a missing, truncated or altered file), or None.

    A checkpoint written before manifests existed is accepted with a warning.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if (folder / DS_TAG).is_dir():
            warnings.warn(f"{folder} has no {MANIFEST} (written by an older metric_ds): its files are not verified",
                          stacklevel=2)
            return None
        return f"{folder} is incomplete: it has no {MANIFEST}, which a save writes last"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is damaged (not the JSON a save writes)"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{path} is truncated or altered ({path.stat().st_size} bytes, the save wrote {meta['size']})"
        if _sha256(path) != meta["sha256"]:
            return f"{path} is damaged (its sha256 differs from the one recorded when it was saved)"
    return None


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """The complete ``step-N`` folders under ``ckpt_root``, oldest first."""
    steps = sorted((int(p.name.split("-", 1)[1]), p) for p in ckpt_root.glob("step-*")
                   if p.is_dir() and p.name.split("-", 1)[1].isdigit())
    return [p for _, p in steps]


def _prune(ckpt_root: Path, keep_last: int) -> None:
    for path in _step_dirs(ckpt_root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _newest_verified(ckpt_root: Path, first: Path | None) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under ``ckpt_root`` that verifies (``first`` tried first), and why others did not."""
    order = ([first] if first is not None else []) + [p for p in reversed(_step_dirs(ckpt_root)) if p != first]
    problems = []
    for candidate in order:
        why = verify_checkpoint(candidate)
        if why is None:
            return candidate, problems
        problems.append(why)
    return None, problems


def resolve_resume(resume_from: str, run_dir: Path) -> Path:
    """Turn ``resume_from`` (``latest``, a run folder, a ``checkpoints`` folder or a ``step-N`` folder) into a
    checkpoint folder whose files verify against its manifest.

    ``latest`` and a run or checkpoints folder take the newest checkpoint that verifies, with a warning when that
    is not the one ``latest`` names, which names every checkpoint skipped and why; an explicit ``step-N`` folder must verify itself.

    Raises:
        UserError: if nothing resumable is there, or the named checkpoint is damaged.
    """
    base = Path(run_dir) if resume_from == LATEST else Path(resume_from)
    for root in (base / "checkpoints", base):
        pointer = root / LATEST
        if not pointer.is_file() and not _step_dirs(root):
            continue
        named = root / pointer.read_text().strip() if pointer.is_file() else None
        chosen, problems = _newest_verified(root, named if named is not None and named.is_dir() else None)
        if chosen is None:
            raise UserError([f"training.resume_from: no checkpoint under {root} can be loaded:", *problems,
                             "Remove resume_from (or set checkpointing.overwrite: true) to start afresh"])
        if problems:
            warnings.warn(f"training.resume_from: skipped {len(problems)} checkpoint(s) that do not verify: "
                          f"{'; '.join(problems)}; resuming from {chosen.name}, the newest checkpoint whose files "
                          "verify", stacklevel=2)
        return chosen
    if (base / DS_TAG).is_dir() or (base / MANIFEST).is_file():
        why = verify_checkpoint(base)
        if why is not None:
            earlier = [p for p in _step_dirs(base.parent) if p != base and verify_checkpoint(p) is None]
            offer = f"; the newest complete checkpoint there is {earlier[-1]}" if earlier else ""
            raise UserError(f"training.resume_from: {why}. This checkpoint cannot be resumed{offer}")
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
            except Exception as exc:  # noqa: BLE001 - a refusal or a damaged file: say which file and which
                text = str(exc)
                if "weights only" in text.lower() or "weights_only" in text:
                    raise UserError(f"training.resume_from: {path} holds objects that a weights-only load refuses "
                                    f"({text.splitlines()[-1][:200]}); metric_ds does not run code from "
                                    "checkpoints. Re-save it with this version of metric_ds") from None
                raise UserError(f"training.resume_from: {path} cannot be read ({type(exc).__name__}: "
                                f"{text.splitlines()[0][:160] if text else 'truncated'}); the checkpoint is "
                                "damaged: resume from an earlier one") from None

        self._original = original
        self.ckpt_engine.load = load

    def __exit__(self, *exc: Any) -> None:
        self.ckpt_engine.load = self._original


def read_client_state(ckpt_dir: Path) -> dict[str, Any]:
    """Our part of a checkpoint (loop state, RNGs, bank, config, data fingerprint), read weights-only, before the
    engine's state is touched: a resume can then refuse a changed config without a half-loaded model."""
    ckpt_dir = Path(ckpt_dir)
    own = ckpt_dir / f"client_state_rank{D.rank()}.pt"
    if not own.is_file():
        own = ckpt_dir / "client_state_rank0.pt"
    try:
        return torch.load(own, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"training.resume_from: {own} is missing; the checkpoint is incomplete") from None
    except Exception as exc:  # noqa: BLE001 - EOFError, OSError, unpickling errors: all mean a damaged file
        raise UserError(f"training.resume_from: {own} cannot be read ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else 'truncated'}); the checkpoint is "
                        "damaged: resume from an earlier one") from None


def ensure_universal(ckpt_dir: Path) -> Path:
    """DeepSpeed's state of ``ckpt_dir`` in its universal form (``ds_universal/``, loadable on any world size),
    converted once by rank 0 with DeepSpeed's ``ds_to_universal`` (a collective: every rank calls it)."""
    ckpt_dir = Path(ckpt_dir)
    out = ckpt_dir / UNIVERSAL_TAG
    if D.is_main() and not (out / "zero").is_dir():
        from types import SimpleNamespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = ckpt_dir / f".tmp-{UNIVERSAL_TAG}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
                ds_to_universal(SimpleNamespace(
                    input_folder=str(ckpt_dir / DS_TAG), output_folder=str(tmp), num_extract_workers=1,
                    num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        except Exception as exc:  # noqa: BLE001 - DeepSpeed's converter: say what failed and the way out
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"training.resume_from: {ckpt_dir} was written by another number of processes and "
                            f"DeepSpeed could not convert it to its universal form ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); resume with the number of "
                            "processes that wrote it") from None
        os.replace(tmp, out)
    _barrier()
    return out


def load_checkpoint(engine: Any, ckpt_dir: Path, client_state: dict[str, Any], tag: str = DS_TAG) -> None:
    """Restore the engine (model, optimizer, scheduler) from ``ckpt_dir``, then the RNG states of
    ``client_state`` (from :func:`read_client_state`) when the world size is the one that wrote them.

    Every file is read with ``torch.load(weights_only=True)``: DeepSpeed's own files through
    :class:`_WeightsOnlyLoads`.
    """
    ckpt_dir = Path(ckpt_dir)
    with _WeightsOnlyLoads(engine):
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"training.resume_from: DeepSpeed could not load {ckpt_dir / tag}")
    if client_state.get("world_size", 1) == D.world_size():
        set_rng_state(client_state["rng"])
