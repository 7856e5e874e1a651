"""The precision of the fused op's fp32 matmuls: IEEE fp32 unless TF32 was asked for (``training.allow_tf32``).

Users often turn TF32 on for the whole process (``torch.set_float32_matmul_precision("high")``). Under TF32 the fused
op and the reference round their logits differently (about three significant digits instead of seven), so the
self-check (:mod:`metric_ds.ops.selfcheck`) would fail on a correct op. So the op's matmuls, forward and backward,
and the whole self-check run with TF32 (and oneDNN's bf16 for fp32) off, and the caller's setting is restored
afterwards. ``training.allow_tf32: true`` (:func:`allow_tf32`) lets the op's matmuls use TF32 as the rest of the
model does; the self-check runs without it whatever the setting.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# torch's per-backend settings of fp32 matmuls that can lower their precision: cuBLAS (TF32) and oneDNN on CPU
# (TF32 or bf16 under set_float32_matmul_precision("high"/"medium")).
_BACKENDS = ("cuda", "mkldnn")
_state = {"allow_tf32": False}


def allow_tf32(flag: bool) -> None:
    """Let the fused op's fp32 matmuls use TF32 (``True``), or keep them IEEE fp32 (``False``, the default).

    ``True`` also turns TF32 on for every fp32 matmul of the process on CUDA, as ``training.allow_tf32: true``
    asks; ``False`` leaves the process's own setting alone and only keeps the op's matmuls in IEEE fp32.
    """
    _state["allow_tf32"] = bool(flag)
    if flag:
        torch.backends.cuda.matmul.allow_tf32 = True  # torch's legacy switch: its other getters keep working


def tf32_allowed() -> bool:
    """Whether the fused op's fp32 matmuls may use TF32 (:func:`allow_tf32`)."""
    return _state["allow_tf32"]


def _get(backend: str) -> str | None:
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)  # torch >= 2.9
    return None if getter is None else getter(backend, "matmul")


def _set(backend: str, value: str | None) -> None:
    setter = getattr(torch._C, "_set_fp32_precision_setter", None)
    if setter is not None and value is not None:
        setter(backend, "matmul", value)


def _legacy() -> str | None:
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:  # the process mixed torch's legacy and per-backend switches: keep to the latter
        return None


@contextmanager
def ieee_fp32_matmuls(force: bool = False) -> Iterator[None]:
    """Run the body with fp32 matmuls in IEEE fp32 (no TF32, no bf16), then restore the caller's setting exactly.

    Args:
        force: also when :func:`allow_tf32` allowed TF32 (the self-check); ``False`` (the op's own calls) leaves
            the setting as it is then.

    Under ``torch.compile`` tracing it does nothing (the op runs later, outside the trace): a compiled model's
    op uses the process's setting.
    """
    if torch.compiler.is_compiling() or (_state["allow_tf32"] and not force):
        yield
        return
    legacy, saved = _legacy(), {b: _get(b) for b in _BACKENDS}
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")  # sets every backend, so torch's getters stay consistent
    for backend in saved:
        _set(backend, "ieee")
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for backend, value in saved.items():
            _set(backend, value)


def describe() -> str:
    """The precision of the fused op's fp32 matmuls, for ``metric-ds env``."""
    if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") == "1":
        return ("TF32 on CUDA: TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 forces it in cuBLAS whatever the settings (the "
                "op's self-check may then fail: unset it)")
    if _state["allow_tf32"]:
        return "TF32 on CUDA (training.allow_tf32: true); the self-check still runs in IEEE fp32"
    process = "TF32" if _get("cuda") == "tf32" or _legacy() in ("high", "medium") else "IEEE fp32"
    return (f"IEEE fp32: TF32 off inside the op and its self-check, whatever the process's setting (now {process}); "
            "training.allow_tf32: true allows TF32")
