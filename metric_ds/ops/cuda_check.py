"""``make cuda-check``: compile the CUDA sources for the default architectures (sm_80, sm_90 and PTX for newer
GPUs: :func:`metric_ds.ops.build.default_arch_list`) without a GPU, failing on errors and on warnings in our own
files (torch's headers are not ours to fix).

    python -m metric_ds.ops.cuda_check [--archs "8.0;9.0+PTX"]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from metric_ds.ops import build


def gencode_flags(arch_list: str) -> list[str]:
    """nvcc ``-gencode`` flags for a ``TORCH_CUDA_ARCH_LIST``-style list (``"8.0;9.0+PTX"``; commas and the
    ``80`` spelling are accepted): machine code for each, and PTX for those marked ``+PTX``."""
    flags = []
    for item in arch_list.replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def nvcc_command(source: Path, output: Path, gencode: list[str]) -> list[str]:
    from torch.utils import cpp_extension

    home = build.real_cuda_home()
    if home is None:
        raise SystemExit("error: nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    includes = [*cpp_extension.include_paths(device_type="cuda"), *build.torch_cuda_include_dirs(),
                sysconfig.get_paths()["include"], str(build.CSRC)]
    import torch

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [str(Path(home) / "bin" / "nvcc"), "-c", str(source), "-o", str(output), *gencode,
            *[f"-I{p}" for p in includes], *cpp_extension.COMMON_NVCC_FLAGS, *build.NVCC_FLAGS, abi,
            "-DTORCH_EXTENSION_NAME=_supcon_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H", "-Xcompiler", "-fPIC",
            "-Xcompiler", "-Wall", "-Xcudafe", "--display_error_number"]


def ours(line: str) -> bool:
    return str(build.CSRC) in line or "csrc/supcon" in line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=None,
                   help="TORCH_CUDA_ARCH_LIST-style list (default: the build's default without a GPU)")
    args = p.parse_args(argv)
    arch_list = args.archs or build.default_arch_list([])
    gencode = gencode_flags(arch_list)
    if build.real_cuda_home():  # before torch looks for it (it would guess from the nvcc wrapper's folder)
        os.environ.setdefault("CUDA_HOME", build.real_cuda_home())
    sources = sorted(build.CSRC.glob("*.cu"))
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            cmd = nvcc_command(source, Path(tmp) / (source.stem + ".o"), gencode)
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            took = time.perf_counter() - start
            lines = (proc.stdout + proc.stderr).splitlines()
            own_warnings = [ln for ln in lines if ours(ln) and "warning" in ln.lower()]
            if proc.returncode != 0:
                failed = True
                print(f"cuda-check: {source.name}: nvcc failed (exit {proc.returncode}) after {took:.0f}s:")
                print("\n".join(lines[-60:]))
            elif own_warnings:
                failed = True
                print(f"cuda-check: {source.name}: warnings in our sources:")
                print("\n".join(own_warnings))
            else:
                print(f"cuda-check: {source.name}: compiled for {arch_list} in {took:.0f}s, "
                      f"no warnings in our code")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
