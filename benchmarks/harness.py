"""One benchmark harness: each case runs in a fresh subprocess (so peak-memory growth is its own), results go
to a long-format CSV, and a Markdown table is generated from it.

A benchmark script only describes its cases and a ``run_case(args) -> list[dict]`` worker; this module does the
timing, memory, subprocess isolation, CSV and Markdown. Every row says what size it measured in one generic column,
``size``: named dimensions such as ``B=4096 d=384`` (SupCon), ``B=64`` (an inference batch) or ``N=1000000 d=384``
(rows to cluster); build it with :func:`size` and read it back with :func:`dims`.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FIELDS = ["op", "provider", "mode", "metric", "unit", "size", "dtype", "p20", "p50", "p80", "status", "device",
          "torch", "threads", "timestamp", "version", "note"]


def size(**dims: int) -> str:
    """The ``size`` column: ``size(B=4096, d=384)`` is ``"B=4096 d=384"`` (the dimensions in the order given)."""
    return " ".join(f"{name}={value}" for name, value in dims.items())


def dims(row: dict[str, Any]) -> dict[str, int]:
    """The dimensions of a row's ``size`` column, in order: ``{"B": 4096, "d": 384}``."""
    return {name: int(value) for name, value in re.findall(r"(\w+)=(-?\d+)", str(row.get("size") or ""))}


def quantiles(values: list[float]) -> tuple[float, float, float]:
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(round(q * (len(v) - 1))))]  # noqa: E731
    return pick(0.2), pick(0.5), pick(0.8)


def time_it(fn: Callable[[], Any], reps: int, warmup: int = 1, sync: Callable[[], None] | None = None,
            clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Times of ``fn`` (after ``warmup`` calls); ``sync`` waits for the device (CUDA). ``clock`` is wall time by
    default; ``time.process_time`` (CPU seconds of every thread of this process) is the fairer measure on a
    shared machine, where wall time mostly counts the waits for a core."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if sync:
            sync()
        start = clock()
        fn()
        if sync:
            sync()
        times.append(clock() - start)
    return times


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def run_in_subprocess(script: Path, case: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Run ``script --worker JSON`` and parse its JSON lines; a crash or timeout becomes a status row."""
    cmd = [sys.executable, str(script), "--worker", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{**case, "status": "timeout", "note": f"> {timeout:.0f}s"}]
    rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 and not rows:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        status = "OOM" if ("out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137)) else "error"
        return [{**case, "status": status, "note": tail}]
    return rows


def parse_or_work(parser: argparse.ArgumentParser, run_case: Callable[[dict[str, Any]], None]
                  ) -> argparse.Namespace | None:
    """The parent's arguments, or, in a case's subprocess (``--worker JSON``, see :func:`run_in_subprocess`),
    ``None`` after running the case."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_case(json.loads(args.worker))
        return None
    return args


def emit(row: dict[str, Any]) -> None:
    """Worker side: print one result row for the parent."""
    print("RESULT " + json.dumps(row), flush=True)


def common_fields(device: str) -> dict[str, Any]:
    from metric_ds import __version__

    return {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "version": __version__}


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})


def markdown_table(rows: list[dict[str, Any]], metric: str, unit: str) -> str:
    """Pivot: one line per (mode, size, dtype), one column per size dimension and per provider, cells = p50 (or
    the status)."""
    providers = sorted({r["provider"] for r in rows})
    names = list(dict.fromkeys(name for r in rows for name in dims(r)))
    rows = [r for r in rows if r["metric"] in (metric, "")]
    key = lambda r: (r["mode"], tuple(dims(r).get(n, 0) for n in names), r["dtype"])  # noqa: E731
    keys = sorted({key(r) for r in rows})
    lines = [f"| mode | {' | '.join(names)} | dtype | {' | '.join(providers)} |",
             "| --- |" + " ---: |" * len(names) + " --- |" + " ---: |" * len(providers)]
    for k in keys:
        mode, values, dtype = k
        cells = []
        for p in providers:
            match = [r for r in rows if r["provider"] == p and key(r) == k]
            if not match:
                cells.append("")
            elif match[0].get("status", "ok") != "ok":
                cells.append(str(match[0]["status"]))
            else:
                cells.append(f"{float(match[0]['p50']):.4g}")
        lines.append(f"| {mode} | {' | '.join(map(str, values))} | {dtype} | {' | '.join(cells)} |")
    return f"{metric} ({unit}, p50):\n\n" + "\n".join(lines)


def replace_between_markers(path: Path, name: str, text: str) -> None:
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    content = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in content and end in content:
        content = content[: content.index(begin)] + block + content[content.index(end) + len(end):]
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    path.write_text(content)
