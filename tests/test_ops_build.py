"""The op's build: the CUDA architecture list (sm_80/sm_90, the visible GPU's own, PTX for newer GPUs), the CUDA
toolkit root torch's builder uses, the libraries' exported symbols, and ``make cuda-check``'s linked library."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metric_ds.ops import build, cuda_check

needs_nm = pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")


@pytest.mark.parametrize("caps,expected", [
    ([], "8.0;9.0+PTX"),  # no GPU visible (cuda-check, METRIC_DS_FORCE_CUDA)
    ([(9, 0)], "8.0;9.0+PTX"),  # H100: already listed
    ([(8, 6)], "8.0;8.6;9.0+PTX"),  # A10/RTX 30xx: its own machine code
    ([(7, 5)], "7.5;8.0;9.0+PTX"),
    ([(10, 0)], "8.0;9.0;10.0+PTX"),  # B200
    ([(12, 0), (8, 9)], "8.0;8.9;9.0;12.0+PTX"),  # RTX 50xx beside an L4: numeric order, not string order
])
def test_default_arch_list(caps, expected):
    assert build.default_arch_list(caps) == expected


@pytest.mark.parametrize("visible,cap,expected", [
    (False, None, "8.0;9.0+PTX"),
    (True, (12, 0), "8.0;9.0;12.0+PTX"),
])
def test_default_arch_list_asks_torch_for_the_visible_gpu(monkeypatch, visible, cap, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if visible else 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: cap)
    assert build.default_arch_list() == expected


def test_extensions_set_the_default_arch_list_only_when_unset(monkeypatch):
    pytest.importorskip("torch.utils.cpp_extension")
    monkeypatch.setattr(build, "cuda_build_decision", lambda: (True, "forced in this test"))
    monkeypatch.setattr(build, "default_arch_list", lambda caps=None: "8.0;9.0;12.0+PTX")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setenv("CUDA_HOME", "/nonexistent-cuda")
    names = [e.name for e in build.extensions()]
    assert names == [build.CPU_NAME, build.CUDA_NAME]
    import os

    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;12.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    build.extensions()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"


def test_setup_resolves_cuda_home_before_cpp_extension_reads_it(tmp_path):
    """nvcc on PATH is a wrapper script (as /usr/local/bin/nvcc is here): torch would guess its folder's parent;
    setup.py must set the root the wrapper execs before torch.utils.cpp_extension is imported."""
    if torch.version.cuda is None:
        pytest.skip("a CPU build of torch: cpp_extension looks for no CUDA toolkit")
    real = tmp_path / "toolkit"  # need not exist: only the root that is chosen matters
    wrapper = tmp_path / "wrapper" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.update(PATH=f"{wrapper.parent}{os.pathsep}{env['PATH']}", METRIC_DS_SKIP_CUDA="1")
    code = ("import runpy, sys; sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')"
            "; from torch.utils import cpp_extension; print('CUDA_HOME=' + str(cpp_extension.CUDA_HOME))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=build.ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"CUDA_HOME={real}\n" in proc.stdout, proc.stdout


def _shared_library(folder: Path, source: str) -> Path:
    folder.mkdir()
    (folder / "lib.cpp").write_text(source)
    subprocess.run(["c++", "-shared", "-fPIC", "-O1", str(folder / "lib.cpp"), "-o", str(folder / "lib.so")],
                   check=True)
    return folder / "lib.so"


@needs_nm
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_own_exports_finds_exported_metric_ds_symbols_only(tmp_path):
    body = "namespace metric_ds { int tile_size(int x) { return x; } }\nint other(int x) { return x; }\n"
    exported = _shared_library(tmp_path / "a", body)
    assert [line.split(" ", 2)[-1] for line in cuda_check.own_exports(exported)] == ["metric_ds::tile_size(int)"]
    hidden_body = f"#pragma GCC visibility push(hidden)\n{body}#pragma GCC visibility pop\n"
    hidden = _shared_library(tmp_path / "b", hidden_body)
    assert cuda_check.own_exports(hidden) == []


@needs_nm
def test_cpu_library_exports_none_of_the_loops_symbols():
    """Both libraries contain the tile loop and are loaded RTLD_GLOBAL: an exported copy would serve the other."""
    libraries = sorted((build.ROOT / "metric_ds").glob("_supcon_cpu*.so"))
    if not libraries:
        pytest.skip("the CPU op is not built (make setup builds it)")
    for library in libraries:
        assert cuda_check.own_exports(library) == [], library
        assert "TORCH_LIBRARY_IMPL_static_init_metric_ds_CPU" in subprocess.run(
            ["nm", str(library)], capture_output=True, text=True, check=True).stdout


@needs_nm
def test_cuda_check_problems_name_each_failure(tmp_path):
    """A library without the CUDA registration (the CPU one stands in), and a log with a warning in our file."""
    libraries = sorted((build.ROOT / "metric_ds").glob("_supcon_cpu*.so"))
    if not libraries:
        pytest.skip("the CPU op is not built (make setup builds it)")
    log = f"{build.CSRC}/supcon_cuda.cu(12): warning #177-D: variable declared but never referenced\n"
    found = cuda_check.problems(libraries[0], log)
    assert found[0].startswith("warnings in our sources:") and "#177-D" in found[0]
    assert "lacks the op's CUDA registration" in found[1]
    assert "registers no CUDA kernel for metric_ds::supcon_fwd" in found[2]
    assert len(found) == 3  # the CPU library exports none of our symbols
    assert cuda_check.problems(None, "torch/include/x.h: warning: not ours\n") == ["no _supcon_cuda*.so was produced"]


@pytest.mark.slow
@needs_nm
def test_cuda_check_builds_links_and_checks_the_cuda_library(tmp_path):
    if torch.version.cuda is None or build.real_cuda_home() is None:
        pytest.skip("needs torch with CUDA and the CUDA toolkit (nvcc)")
    package_libraries = sorted((build.ROOT / "metric_ds").glob("*.so"))
    proc = subprocess.run([sys.executable, "-m", "metric_ds.ops.cuda_check", "--archs", "9.0", "--keep",
                           str(tmp_path)], check=False, cwd=build.ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    (library,) = (tmp_path / "lib").rglob("_supcon_cuda*.so")
    assert sorted((build.ROOT / "metric_ds").glob("*.so")) == package_libraries  # built beside, not into, the package
    assert cuda_check.registers_cuda_op(library)
    assert cuda_check.own_exports(library) == []
    dynamic = subprocess.run(["readelf", "-h", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "DYN (Shared object file)" in dynamic
    assert "libc10_cuda.so" in dynamic and "libcudart" in dynamic  # linked against torch's and CUDA's runtimes
