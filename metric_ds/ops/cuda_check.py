"""``make cuda-check``: build and link the whole CUDA extension (``_supcon_cuda*.so``) without a GPU, into a
temporary folder (never the package), for the default architectures (sm_80, sm_90 and PTX for newer GPUs:
:func:`metric_ds.ops.build.default_arch_list`), with the same extension definition as ``setup.py``.

It fails on compiler errors, on warnings in our own files (torch's headers are not ours to fix), on a library
that does not load (an unresolved symbol), lacks the op's CUDA registration, or exports the tile loop's symbols.

    python -m metric_ds.ops.cuda_check [--archs "8.0;9.0+PTX"] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metric_ds.ops import build

# Added to the build's own flags for the check only: warnings on, and nvcc's warning numbers shown.
WARNING_FLAGS = {"cxx": ["-Wall"], "nvcc": ["-Xcompiler", "-Wall", "-Xcudafe", "--display_error_number"]}
REGISTRATION = "TORCH_LIBRARY_IMPL_static_init_metric_ds_CUDA"
_LOAD = ("import sys, torch; torch.ops.load_library(sys.argv[1]); "
         "torch._C._dispatch_has_kernel_for_dispatch_key('metric_ds::supcon_fwd', 'CUDA') or "
         "sys.exit('it loads, but registers no CUDA kernel for metric_ds::supcon_fwd')")


def build_into(out: str) -> None:
    """Build the CUDA extension into ``out``/lib (objects in ``out``/obj); run in a subprocess, cwd ``out``."""
    from setuptools import setup

    ext = build.cuda_extension(WARNING_FLAGS)  # resolves CUDA_HOME before importing cpp_extension
    from torch.utils.cpp_extension import BuildExtension

    ext.sources = [str(build.ROOT / s) for s in ext.sources]
    setup(name="metric_ds_cuda_check", packages=[], py_modules=[], ext_modules=[ext],
          script_args=["-q", "build_ext", "--build-lib", str(Path(out) / "lib"), "--build-temp",
                       str(Path(out) / "obj")],
          cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})


def own_exports(library: Path) -> list[str]:
    """The dynamic symbols of ``library`` that are our code (namespace ``metric_ds``): none should be exported."""
    out = subprocess.run(["nm", "-D", "--defined-only", "-C", str(library)], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if "metric_ds::" in line]


def registers_cuda_op(library: Path) -> bool:
    """Whether ``library`` contains the op's CUDA registration (the static object ``TORCH_LIBRARY_IMPL`` defines)."""
    out = subprocess.run(["nm", str(library)], capture_output=True, text=True, check=True).stdout
    return REGISTRATION in out


def ours(line: str) -> bool:
    return str(build.CSRC) in line or "csrc/supcon" in line


def problems(library: Path | None, log: str) -> list[str]:
    """What is wrong with a finished build: its log's warnings in our files, and the linked library's checks."""
    own_warnings = [ln for ln in log.splitlines() if ours(ln) and "warning" in ln.lower()]
    found = ["warnings in our sources:\n" + "\n".join(own_warnings)] if own_warnings else []
    if library is None:
        return found + ["no _supcon_cuda*.so was produced"]
    if not registers_cuda_op(library):
        found.append(f"{library.name} lacks the op's CUDA registration ({REGISTRATION})")
    exports = own_exports(library)
    if exports:
        found.append(f"{library.name} exports our symbols (keep them hidden, as csrc/supcon/supcon.h does):\n"
                     + "\n".join(exports))
    load = subprocess.run([sys.executable, "-c", _LOAD, str(library)], check=False, capture_output=True, text=True)
    if load.returncode != 0:
        found.append(f"{library.name} does not load: {(load.stderr.strip().splitlines() or ['?'])[-1]}")
    return found


def check(arch_list: str, out: Path) -> int:
    """Build into ``out`` and check the result; prints one line per outcome, returns the exit status."""
    if build.resolve_cuda_home() is None:
        print("cuda-check: error: nvcc not found: install the CUDA toolkit or set CUDA_HOME")
        return 1
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch_list,
               PYTHONPATH=os.pathsep.join(filter(None, [str(build.ROOT), os.environ.get("PYTHONPATH")])))
    code = "import sys; from metric_ds.ops.cuda_check import build_into; build_into(sys.argv[1])"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(out)], check=False, capture_output=True, text=True,
                          env=env, cwd=out)
    took = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        print(f"cuda-check: the CUDA extension failed to build (exit {proc.returncode}) after {took:.0f}s:")
        print("\n".join(log.splitlines()[-60:]))
        return 1
    library = next(iter(sorted((out / "lib").rglob("_supcon_cuda*.so"))), None)
    found = problems(library, log)
    for problem in found:
        print(f"cuda-check: {problem}")
    if not found:
        print(f"cuda-check: {library.name} built and linked for {arch_list} in {took:.0f}s; it loads, registers "
              f"the CUDA kernels, exports none of our symbols; no warnings in our code")
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=None,
                   help="TORCH_CUDA_ARCH_LIST-style list (default: the build's default without a GPU)")
    p.add_argument("--keep", type=Path, default=None,
                   help="build into this folder and keep it (default: a temporary folder, removed afterwards)")
    args = p.parse_args(argv)
    arch_list = args.archs or build.default_arch_list([])
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return check(arch_list, args.keep.resolve())
    with tempfile.TemporaryDirectory(prefix="metric_ds_cuda_check_") as tmp:
        return check(arch_list, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
