"""The fused SupCon op: loading the compiled library, its fake kernels and its autograd formula.

The C++/CUDA sources are in ``csrc/supcon/``; ``pip install -e .`` builds them ahead of time
(``metric_ds/_supcon_cpu*.so``, and ``_supcon_cuda*.so`` where CUDA is built). When the prebuilt CPU library is
missing, it is JIT-compiled with ``torch.utils.cpp_extension.load`` into ``TORCH_EXTENSIONS_DIR`` (about 30 s,
once); ``METRIC_DS_NO_JIT=1`` disables that.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from metric_ds.ops import build
from metric_ds.ops.precision import ieee_fp32_matmuls
from metric_ds.ops.reference import check_labels

_PKG = Path(__file__).resolve().parent.parent
_state: dict[str, object] = {"loaded": False, "errors": {}}


def _has_kernel(key: str) -> bool:
    return hasattr(torch.ops, "metric_ds") and hasattr(torch.ops.metric_ds, "supcon_fwd") and \
        torch._C._dispatch_has_kernel_for_dispatch_key("metric_ds::supcon_fwd", key)


def _load_prebuilt(stem: str) -> bool:
    for path in sorted(_PKG.glob(f"{stem}*.so")):
        try:
            torch.ops.load_library(str(path))
            return True
        except OSError as exc:
            _state["errors"][stem] = f"{path.name} failed to load: {exc}"
    return False


def _jit_cpu() -> None:
    build.resolve_cuda_home()  # cpp_extension reads CUDA_HOME once, at its first import
    from torch.utils.cpp_extension import load

    load(name="metric_ds_supcon_cpu", sources=[str(build.CSRC / s) for s in build.CPU_SOURCES],
         extra_cflags=build.CXX_FLAGS, is_python_module=False, verbose=False)


def ensure_loaded() -> None:
    """Load the op libraries once (prebuilt, else JIT for CPU) and register the Python parts."""
    if _state["loaded"]:
        return
    _state["loaded"] = True
    if not _load_prebuilt("_supcon_cpu"):
        if os.environ.get("METRIC_DS_NO_JIT") == "1":
            _state["errors"]["cpu"] = "not built (run `make setup` or `pip install -e .`); JIT disabled"
        elif not build.CSRC.is_dir():
            _state["errors"]["cpu"] = f"not built and the sources ({build.CSRC}) are absent"
        else:
            try:
                _jit_cpu()
            except Exception as exc:  # noqa: BLE001 - any compiler failure: record why, fall back
                _state["errors"]["cpu"] = f"JIT build failed: {str(exc).strip().splitlines()[-1][:300]}"
    if _has_kernel("CPU") and torch.cuda.is_available():
        if not _load_prebuilt("_supcon_cuda"):
            _state["errors"].setdefault("cuda", "the CUDA part is not built: " + build.cuda_build_decision()[1]
                                        + "; rebuild with `pip install --no-build-isolation -e .` on a GPU machine")
    if hasattr(torch.ops, "metric_ds") and hasattr(torch.ops.metric_ds, "supcon_fwd"):
        _register_python_parts()


_available: dict[str, tuple[bool, str]] = {}


def available(device_type: str) -> tuple[bool, str]:
    """Whether the fused op runs on ``device_type`` ('cpu' or 'cuda'), and why not (memoised, so that
    ``torch.compile`` traces a dictionary lookup rather than the dispatcher query)."""
    if device_type not in _available:
        _available[device_type] = _check_available(device_type)
    return _available[device_type]


def _check_available(device_type: str) -> tuple[bool, str]:
    ensure_loaded()
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is not None and _has_kernel(key):
        return True, "built"
    errors = _state["errors"]
    if device_type == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device"
    reason = errors.get(device_type) or errors.get(f"_supcon_{device_type}") or errors.get("cpu") or \
        f"no {device_type} kernel is built"
    return False, str(reason)


_registered = False


def _register_python_parts() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("metric_ds::supcon_fwd")
    def _fwd_fake(z, labels, temperature, anchor_start, anchor_count, num_classes=-1):
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        return tuple(z.new_empty((anchor_count,), dtype=acc) for _ in range(3))

    @torch.library.register_fake("metric_ds::supcon_bwd")
    def _bwd_fake(grad_rows, z, labels, lse, num_pos, temperature, anchor_start, anchor_count, num_classes=-1):
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        z, labels, temperature, anchor_start, anchor_count, *rest = inputs
        _, lse, num_pos = output
        ctx.save_for_backward(z, labels, lse, num_pos)
        ctx.args = (temperature, anchor_start, anchor_count, rest[0] if rest else -1)
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad_rows, grad_lse, grad_num_pos):
        z, labels, lse, num_pos = ctx.saved_tensors
        nones = (None,) * (ctx.num_inputs - 1)
        if grad_rows is None:
            return (None, *nones)
        with ieee_fp32_matmuls():
            dz = torch.ops.metric_ds.supcon_bwd(grad_rows.contiguous(), z, labels, lse, num_pos, *ctx.args)
        return (dz, *nones)

    torch.library.register_autograd("metric_ds::supcon_fwd", backward, setup_context=setup_context)


def supcon_loss_fused(z: torch.Tensor, labels: torch.Tensor, temperature: float, anchor_start: int,
                      anchor_count: int, num_valid_global: int | torch.Tensor | None,
                      num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op behind :func:`metric_ds.ops.supcon_loss` (same contract).

    ``num_classes``: labels already lie in ``[0, num_classes)``, so the op needs no ``unique`` and no read-back
    of the largest label (no host-device synchronisation); ``None`` accepts any int64 labels. CPU labels outside
    ``[0, num_classes)`` raise a ``ValueError`` here (:func:`~metric_ds.ops.reference.check_labels`).
    """
    check_labels(labels, num_classes)
    with ieee_fp32_matmuls():  # unless training.allow_tf32 (metric_ds.ops.precision)
        loss_rows, _, num_pos = torch.ops.metric_ds.supcon_fwd(z, labels, float(temperature), int(anchor_start),
                                                               int(anchor_count),
                                                               -1 if num_classes is None else int(num_classes))
    num_valid = (num_pos > 0).sum()
    denom = num_valid if num_valid_global is None else torch.as_tensor(num_valid_global, device=z.device)
    return loss_rows.sum() / denom.clamp_min(1).to(loss_rows.dtype), num_valid
