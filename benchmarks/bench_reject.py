"""What rejecting out-of-scope texts adds to ``predict``: ``LoadedModel.predict(texts)`` against
``predict(texts, reject=True, score=S)`` for each in-scope score, on CPU at batch 64.

    .venv/bin/python benchmarks/bench_reject.py --model demo_runs/banking77/best   # after `make demo`
    .venv/bin/python benchmarks/bench_reject.py --model M --texts 1024 --reps 5 --note "quiet machine"

The model must be calibrated (``open_set.json``; training writes it, or ``metric-ds calibrate``): the ``knn`` score
searches its reference rows (``reference.safetensors``), so its cost grows with their number, which each row
records. Each case (no rejection, ``msp``, ``knn``, ``centroid``) runs in a fresh process on the first ``--texts``
sentences of BANKING77's ``test.csv``; one rep is one ``predict`` call over them, tokenisation, length-sorted
batching and the scores included; texts/s = texts / the call's wall time. The cases run ``--rounds`` times in a
rotated order (fresh processes differ by a few percent, more than the scores cost), and each keeps the round with
its median p50. Results: ``results/reject.csv`` and the table in ``benchmarks/README.md``, with each score's
overhead against no rejection.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402

HERE = Path(__file__).resolve().parent
BANKING77 = Path(os.environ.get("BANKING77_DIR", HERE.parent / "data" / "banking77"))
PROVIDERS = ["none", "msp", "knn", "centroid"]  # "none": predict without rejection


def run_case(case: dict) -> None:
    """Worker: one score in this fresh process; prints a RESULT row."""
    import pandas as pd

    import metric_ds

    torch.set_num_threads(case["threads"])
    texts = pd.read_csv(BANKING77 / "test.csv")["text"].astype(str).tolist()[: case["texts"]]
    model = metric_ds.load(case["model"], device="cpu", batch_size=case["B"])
    score = case["provider"]
    reference_rows = len(model.require_open_set().reference.z)

    def one_pass() -> None:
        if score == "none":
            model.predict(texts, show_progress=False)
        else:
            model.predict(texts, show_progress=False, reject=True, score=score)

    times = harness.time_it(one_pass, case["reps"], warmup=1)
    p20, p50, p80 = harness.quantiles([len(texts) / t for t in times])
    harness.emit({**harness.common_fields("cpu"), "op": "predict", "provider": score, "mode": "inference",
                  "metric": "throughput", "unit": "texts/s", "size": harness.size(B=case["B"]), "dtype": "fp32",
                  "p20": p20, "p50": p50, "p80": p80, "status": "ok",
                  "note": f"{len(texts)} BANKING77 test texts; {reference_rows} reference rows; {case['note']}"})


def median_run(found: list[dict]) -> dict:
    """Of one case's rounds, the one with the median p50 (its p20 and p80 with it)."""
    ok = sorted((r for r in found if r.get("status") == "ok"), key=lambda r: float(r["p50"]))
    return ok[len(ok) // 2] if ok else found[0]


def overheads(rows: list[dict]) -> str:
    """Each score's time over no rejection's, from the p50 throughputs."""
    by = {r["provider"]: float(r["p50"]) for r in rows if r.get("status") == "ok"}
    if "none" not in by:
        return "no baseline measured"
    return ", ".join(f"{s} {100 * (by['none'] / by[s] - 1):+.1f}%" for s in PROVIDERS[1:] if s in by)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(HERE.parent / "demo_runs" / "banking77" / "best"),
                   help="a calibrated model folder (default: make demo's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--texts", type=int, default=1024, help="how many test.csv sentences one predict call classifies")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="each case this many times, in rotated order; the median")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--note", default="", help="machine conditions, recorded in each row (e.g. the load)")
    p.add_argument("--out", default=str(HERE / "results" / "reject.csv"))
    p.add_argument("--timeout", type=float, default=1800)
    args = harness.parse_or_work(p, run_case)
    if args is None:
        return
    if not (Path(args.model) / "open_set.json").is_file():
        raise SystemExit(f"{args.model}: not a calibrated model folder (no open_set.json); run make demo, or "
                         "metric-ds calibrate, or pass --model")
    runs: dict[str, list[dict]] = {p: [] for p in PROVIDERS}
    for round_ in range(args.rounds):  # rotated order: no case always runs first (a cold machine) or last
        for provider in PROVIDERS[round_ % len(PROVIDERS):] + PROVIDERS[:round_ % len(PROVIDERS)]:
            case = {"provider": provider, "B": args.batch_size, "texts": args.texts, "reps": args.reps,
                    "threads": args.threads, "model": str(args.model), "note": args.note}
            for r in harness.run_in_subprocess(Path(__file__), case, args.timeout):
                runs[provider].append(r)
                shown = f"{float(r['p50']):.1f} texts/s" if r.get("status") == "ok" else r.get("status")
                print(f"round {round_ + 1}, {provider:>9}: {shown}", flush=True)
    rows = [{**harness.common_fields("cpu"), "op": "predict", "mode": "inference", "metric": "throughput",
             "unit": "texts/s", "size": harness.size(B=args.batch_size), "dtype": "fp32", **median_run(found)}
            for found in runs.values() if found]
    harness.write_csv(rows, Path(args.out))
    note = next((r["note"] for r in rows if r.get("note")), "")
    text = "\n\n".join([
        f"Device: {harness.device_name('cpu')}; torch {torch.__version__}; {args.threads} threads; fp32; "
        f"{args.reps} reps; model {Path(args.model).parent.name}/{Path(args.model).name}; {note}",
        harness.markdown_table(rows, "throughput", "texts/s"),
        "Time added by rejection (p50): " + overheads(rows) + ".",
    ])
    harness.replace_between_markers(HERE / "README.md", "reject", text)
    print(f"wrote {args.out} and benchmarks/README.md")


if __name__ == "__main__":
    main()
