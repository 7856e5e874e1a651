"""``metric-ds env``: what this environment can run (versions, devices, the fused op's build status and the
precision of its fp32 matmuls)."""
from __future__ import annotations

import platform
import shutil
import subprocess


def _version(cmd: list[str]) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    return out[-1] if out else "?"


def env_report() -> str:
    """A table of versions and capabilities."""
    import torch

    rows: list[tuple[str, str]] = [
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("torch CUDA build", str(torch.version.cuda)),
        ("CUDA available", f"{torch.cuda.is_available()} ({torch.cuda.device_count()} devices)"),
        ("torch threads", str(torch.get_num_threads())),
    ]
    for name in ("transformers", "deepspeed", "pydantic", "pandas", "pyarrow"):
        try:
            module = __import__(name)
            rows.append((name, getattr(module, "__version__", "?")))
        except ImportError:
            rows.append((name, "not installed"))
    rows.append(("g++", _version(["g++", "-dumpfullversion"])))
    rows.append(("nvcc", _version(["nvcc", "--version"])))
    from metric_ds.ops import op_status

    from metric_ds.ops.precision import describe

    for key, value in op_status().items():
        rows.append((f"supcon op: {key}", str(value)))
    rows.append(("supcon op: fp32 matmuls", describe()))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
