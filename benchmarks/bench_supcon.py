"""SupCon benchmark: reference vs reference under torch.compile vs fused vs gemm_bound.

    .venv/bin/python benchmarks/bench_supcon.py                    # this machine's default grid
    .venv/bin/python benchmarks/bench_supcon.py --B 1024 4096 --d 384 --providers fused reference

Modes: forward (loss, graph kept), backward (``loss.backward()`` alone), full (both). ``gemm_bound`` is the time of
the least a memory-linear forward and backward can do: one B x B x d matmul for the similarities and one for the
gradient product (two for full). Memory is the peak growth over the case's setup: peak RSS of a fresh process on
CPU, ``max_memory_allocated`` on CUDA. Results: ``benchmarks/results/supcon.csv`` (long format) and a table in
``benchmarks/README.md``. A case the reference cannot hold in memory is recorded as OOM (estimated: the reference
keeps about four B x B fp32 matrices), not run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402

HERE = Path(__file__).resolve().parent
PROVIDERS = ["reference", "reference_compiled", "fused", "gemm_bound"]
MODES = ["full", "forward", "backward"]  # gemm_bound's backward at B > 8192 includes recomputing S
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(b: int, d: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(device=device, dtype=dtype)
    y = torch.randint(0, max(b // 16, 2), (b,), generator=g).to(device)
    return z, y


def _loss_fn(provider: str):
    from metric_ds.ops import supcon_loss, supcon_loss_reference

    if provider == "reference":
        return lambda z, y: supcon_loss_reference(z, y, 0.1)[0]
    if provider == "reference_compiled":
        compiled = torch.compile(lambda z, y: supcon_loss_reference(z, y, 0.1)[0])
        return compiled
    if provider == "fused":
        return lambda z, y: supcon_loss(z, y, 0.1, impl="fused")[0]
    raise ValueError(provider)


def run_case(case: dict) -> list[dict]:
    """One (provider, B, d, dtype): its result rows (a worker process prints them as RESULT lines)."""
    rows: list[dict] = []
    b, d, device, reps = case["B"], case["d"], case["device"], case["reps"]
    dtype = DTYPES[case["dtype"]]
    sync = torch.cuda.synchronize if device == "cuda" else None
    clock = time.process_time if case.get("clock") == "cpu" else time.perf_counter
    base = {**harness.common_fields(device), "op": "supcon", "provider": case["provider"],
            "size": harness.size(B=b, d=d), "dtype": case["dtype"], "status": "ok"}
    z0, y = _inputs(b, d, dtype, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated()
    else:
        mem_before = harness.rss_bytes()

    if case["provider"] == "gemm_bound":
        # The same flops as B x B x d twice, in row blocks of at most 8192 so that large B needs no B x B matrix,
        # with the fused op's own operands and outputs (csrc/supcon/supcon_loop.cpp, gemm and weight_type): z as
        # it is and fp32 out on CUDA (tensor cores for bf16/fp16), fp32 on the CPU (which upcasts at the GEMM);
        # the gradient GEMM's weights in bf16 for bf16 input, fp32 otherwise.
        zs = z0 if device == "cuda" else z0.float()
        zw = z0 if device == "cuda" and dtype == torch.bfloat16 else z0.float()
        zt = zs.t().contiguous()
        blocks = [zs[i:i + 8192] for i in range(0, b, 8192)]

        def sim(blk):
            return torch.mm(blk, zt, out_dtype=torch.float32) if blk.dtype != torch.float32 else blk @ zt

        def grad(s):
            return torch.mm(s.to(zw.dtype), zw, out_dtype=torch.float32) if zw.dtype != torch.float32 else s @ zw

        sims = [sim(blk) for blk in blocks] if b <= 8192 else None

        def fwd():
            for blk in blocks:
                sim(blk)

        def bwd():
            for k, blk in enumerate(blocks):
                grad(sims[k] if sims is not None else sim(blk))

        def both():
            for blk in blocks:
                grad(sim(blk))

        steps = {"forward": fwd, "backward": bwd, "full": both}
        full = both
        full()
    else:
        fn = _loss_fn(case["provider"])

        def full():
            z = z0.detach().requires_grad_()
            fn(z, y).backward()

        def forward():
            z = z0.detach().requires_grad_()
            return fn(z, y)

        full()  # warm-up, and the memory peak of one forward + backward
        steps = {"full": full, "forward": forward}
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - mem_before
    else:
        peak = harness.peak_rss_bytes() - mem_before
    rows.append({**base, "mode": "full", "metric": "peak_mem_growth", "unit": "MiB",
                 "p20": peak / 2**20, "p50": peak / 2**20, "p80": peak / 2**20})
    for mode in case["modes"]:
        if mode == "backward" and case["provider"] != "gemm_bound":
            times = []
            for _ in range(reps):
                loss = steps["forward"]()
                if sync:
                    sync()
                start = clock()
                loss.backward()
                if sync:
                    sync()
                times.append(clock() - start)
        else:
            times = harness.time_it(steps[mode], reps, warmup=0 if mode == "full" else 1, sync=sync, clock=clock)
        p20, p50, p80 = harness.quantiles(times)
        rows.append({**base, "mode": mode, "metric": "time", "unit": "s", "p20": p20, "p50": p50, "p80": p80,
                     "note": f"{len(times)} reps" + (", CPU seconds" if case.get("clock") == "cpu" else "")})
    return rows


def run_case_here(case: dict) -> list[dict]:
    """``--in-process``: one process for every case, saving a process start per case. On CUDA the peak memory is
    still each case's own (the allocator's peak is reset before it and its cache emptied after); on CPU the peak
    RSS only grows, so no memory row is written."""
    try:
        rows = run_case(case)
        return rows if case["device"] == "cuda" else [r for r in rows if r["metric"] != "peak_mem_growth"]
    except torch.cuda.OutOfMemoryError as exc:
        return [{**case, "status": "OOM", "note": str(exc).splitlines()[0][:200]}]
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def reference_fits(b: int, device: str) -> bool:
    need = 4 * b * b * 4  # ~four fp32 B x B matrices live at the peak
    if device == "cuda":
        return need < torch.cuda.get_device_properties(0).total_memory * 0.9
    with open("/proc/meminfo") as fh:
        avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable"))
    return need < avail * 0.8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, nargs="+", default=None)
    p.add_argument("--d", type=int, nargs="+", default=[384])
    p.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compile-max-B", type=int, default=4096, help="largest B tried under torch.compile")
    p.add_argument("--out", default=str(HERE / "results" / "supcon.csv"))
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: CPU seconds of the process (all threads), for a CPU shared with other jobs")
    p.add_argument("--in-process", action="store_true",
                   help="run every case in this process (on CPU without memory figures: RSS peaks only grow)")
    p.add_argument("--reference-max-B", type=int, default=None, help="skip the reference above this B")
    p.add_argument("--markdown", default=str(HERE / "README.md"),
                   help="file whose 'supcon' markers receive the tables (created if absent)")
    args = harness.parse_or_work(p, lambda case: [harness.emit(row) for row in run_case(case)])
    if args is None:
        return

    device = args.device
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    # CUDA from 256: auto's crossover to the reference (ops.AUTO_MIN_ROWS) is measured somewhere in 256..2048
    cuda_sizes = [256, 512, 1024, 2048, 4096, 16384, 65536]
    sizes = args.B or (cuda_sizes if device == "cuda" else [1024, 4096, 8192, 16384, 65536])
    rows: list[dict] = []
    for d in args.d:
        for b in sizes:
            for provider in args.providers:
                reps = args.reps if b <= 8192 else (2 if b <= 16384 else 1)
                case = {"provider": provider, "B": b, "d": d, "dtype": dtype, "device": device, "reps": reps,
                        "clock": args.clock,
                        "modes": args.modes if b <= 16384 else ["full"]}
                meta = {**harness.common_fields(device), "op": "supcon", "provider": provider,
                        "size": harness.size(B=b, d=d), "dtype": dtype, "mode": "full", "metric": "", "unit": ""}
                if provider.startswith("reference") and not reference_fits(b, device):
                    rows.append({**meta, "status": "OOM", "note": "estimated: 4 B^2 fp32 exceed memory"})
                    print(f"{provider:>18} B={b:>6} d={d}: OOM (estimated)", flush=True)
                    continue
                if provider == "reference_compiled" and b > args.compile_max_B:
                    rows.append({**meta, "status": "skipped", "note": f"B > --compile-max-B {args.compile_max_B}"})
                    continue
                if provider in ("reference",) and device == "cpu" and b > 16384:
                    rows.append({**meta, "status": "skipped", "note": "too slow on this CPU"})
                    continue
                if provider.startswith("reference") and args.reference_max_B and b > args.reference_max_B:
                    rows.append({**meta, "status": "skipped", "note": f"B > --reference-max-B {args.reference_max_B}"})
                    continue
                got = run_case_here(case) if args.in_process else \
                    harness.run_in_subprocess(Path(__file__), case, args.timeout)
                for r in got:
                    r.setdefault("mode", "full")
                    r.setdefault("metric", "")
                    r.setdefault("unit", "")
                    r = {**meta, **r}
                    rows.append(r)
                    if r.get("status", "ok") == "ok":
                        print(f"{provider:>18} B={b:>6} d={d} {r['mode']:>8} {r['metric']:>15}: "
                              f"{float(r['p50']):.4g} {r['unit']}", flush=True)
                    else:
                        print(f"{provider:>18} B={b:>6} d={d}: {r['status']} {r.get('note', '')}", flush=True)
    out = Path(args.out)
    previous = []
    if out.exists():  # keep other devices' rows (e.g. a GPU run) beside this one
        import csv

        with out.open() as fh:
            previous = [r for r in csv.DictReader(fh) if r["device"] != harness.device_name(device)]
    harness.write_csv(previous + rows, out)
    all_rows = previous + rows
    text = "\n\n".join([
        f"Device(s): {', '.join(sorted({r['device'] for r in all_rows}))}; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}.",
        harness.markdown_table(all_rows, "time", "s"),
        harness.markdown_table(all_rows, "peak_mem_growth", "MiB"),
    ])
    harness.replace_between_markers(Path(args.markdown), "supcon", text)
    print(f"wrote {out} and {args.markdown}")


if __name__ == "__main__":
    main()
