"""How the fused SupCon op is built: sources, flags and the CUDA decision (one place for setup.py and JIT).

Environment switches: ``METRIC_DS_SKIP_CUDA=1`` never builds the CUDA part; ``METRIC_DS_FORCE_CUDA=1`` builds it
even without a visible GPU (it is otherwise skipped there, since it could not run; ``make cuda-check`` proves it
compiles); ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default: :func:`default_arch_list`, i.e. 8.0 and
9.0 plus the visible GPU's own, with ``+PTX`` on the highest so that newer GPUs JIT-compile from PTX).

This module imports only torch and the standard library, so setup.py can load it by path.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc" / "supcon"
CPU_SOURCES = ["supcon_loop.cpp", "supcon_cpu.cpp"]
CUDA_SOURCES = ["supcon_loop.cpp", "supcon_cuda.cu"]
CPU_NAME = "metric_ds._supcon_cpu"
CUDA_NAME = "metric_ds._supcon_cuda"
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp-simd"]
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo"]
BASE_ARCHS = ("8.0", "9.0")


def real_cuda_home() -> str | None:
    """The CUDA toolkit root. ``nvcc`` on PATH may be a wrapper script that execs the real one; follow it."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    path = Path(nvcc).resolve()
    try:
        text = path.read_text(errors="ignore")[:4096] if path.stat().st_size < 65536 else ""
    except OSError:
        text = ""
    match = re.search(r"exec\s+(\S+/bin/nvcc)", text)
    if match:
        path = Path(match.group(1))
    return str(path.parent.parent)


def resolve_cuda_home() -> str | None:
    """Set ``CUDA_HOME`` to :func:`real_cuda_home` where unset, and return it.

    ``torch.utils.cpp_extension`` reads ``CUDA_HOME`` once, when first imported, and otherwise guesses the root
    from ``nvcc``'s folder on PATH (a wrapper script's folder, e.g. ``/usr/local``): call this before that import.
    """
    home = real_cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
    return home


def torch_cuda_include_dirs() -> list[str]:
    """torch's own CUDA headers (nvidia/cu13/include in site-packages): the toolkit here lacks cuBLAS headers."""
    import torch

    site = Path(torch.__file__).resolve().parent.parent
    return [str(p) for p in sorted(site.glob("nvidia/cu*/include")) + sorted(site.glob("nvidia/*/include"))
            if p.is_dir()]


def cuda_build_decision() -> tuple[bool, str]:
    """Whether to build the CUDA extension, and why (not)."""
    import torch

    if os.environ.get("METRIC_DS_SKIP_CUDA") == "1":
        return False, "METRIC_DS_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if real_cuda_home() is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if os.environ.get("METRIC_DS_FORCE_CUDA") == "1":
        return True, "METRIC_DS_FORCE_CUDA=1"
    if not torch.cuda.is_available():
        return False, "no GPU visible (METRIC_DS_FORCE_CUDA=1 builds it anyway; `make cuda-check` compiles it)"
    return True, "torch has CUDA, nvcc found and a GPU is visible"


def default_arch_list(capabilities: list[tuple[int, int]] | None = None) -> str:
    """The ``TORCH_CUDA_ARCH_LIST`` used when the user sets none.

    Machine code for sm_80 and sm_90, plus each visible GPU's own architecture (an sm_120 card would otherwise
    get "no kernel image is available"), and ``+PTX`` on the highest listed one, which the driver JIT-compiles
    for any newer GPU.

    Args:
        capabilities: (major, minor) of the GPUs to build for; ``None`` asks torch for the visible ones (none
            when no GPU is visible).

    Returns:
        e.g. ``"8.0;9.0+PTX"``, or ``"8.0;9.0;12.0+PTX"`` with an sm_120 GPU visible.
    """
    if capabilities is None:
        import torch

        capabilities = ([torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
                        if torch.cuda.is_available() else [])
    archs = set(BASE_ARCHS) | {f"{major}.{minor}" for major, minor in capabilities}
    ordered = sorted(archs, key=lambda a: tuple(int(x) for x in a.split(".")))
    return ";".join(ordered[:-1] + [ordered[-1] + "+PTX"])


def _sources(names: list[str]) -> list[str]:
    return [str((CSRC / n).relative_to(ROOT)) for n in names]


def cuda_extension(extra_compile_args: dict[str, list[str]] | None = None):
    """The CUDA extension (``CUDA_NAME``); ``extra_compile_args`` are appended to the build's own flags."""
    resolve_cuda_home()
    from torch.utils import cpp_extension

    extra = extra_compile_args or {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list())
    return cpp_extension.CUDAExtension(
        CUDA_NAME, _sources(CUDA_SOURCES), include_dirs=torch_cuda_include_dirs(),
        extra_compile_args={"cxx": CXX_FLAGS + extra.get("cxx", []), "nvcc": NVCC_FLAGS + extra.get("nvcc", [])})


def extensions() -> list:
    """setuptools extensions for ``setup.py``."""
    resolve_cuda_home()
    from torch.utils import cpp_extension

    exts = [cpp_extension.CppExtension(CPU_NAME, _sources(CPU_SOURCES), extra_compile_args={"cxx": CXX_FLAGS})]
    build_cuda, why = cuda_build_decision()
    print(f"metric_ds: CUDA SupCon op {'built' if build_cuda else 'skipped'}: {why}")
    if build_cuda:
        exts.append(cuda_extension())
        print(f"metric_ds: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return exts
