"""The CUDA build's architecture list: sm_80/sm_90, the visible GPU's own, and PTX for newer GPUs."""
from __future__ import annotations

import pytest
import torch

from metric_ds.ops import build
from metric_ds.ops.cuda_check import gencode_flags


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


@pytest.mark.parametrize("arch_list,expected", [
    ("8.0;9.0+PTX", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]),
    ("80,90", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]),
])
def test_cuda_check_gencode_flags(arch_list, expected):
    assert gencode_flags(arch_list) == expected
