"""Scale of ``metric-ds pseudo-label``'s grouping step: 1,000,000 x 384 float32 embeddings (random but clustered,
unit rows, as a sentence encoder gives), grouped by k-means (scikit-learn MiniBatchKMeans, the path above
``FULL_KMEANS_MAX_ROWS``) and by the k-NN vote, with time and peak memory.

    .venv/bin/python benchmarks/bench_cluster.py [--rows 1000000] [--dim 384]

Each case runs in a fresh subprocess (``harness.py``); results go to ``results/cluster.csv`` and to the
``cluster`` table of ``benchmarks/README.md``. The embedding itself is the encoder's cost and is not measured
here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import harness  # noqa: E402

CSV = HERE / "results" / "cluster.csv"


def clustered(n: int, d: int, centres: int, seed: int) -> np.ndarray:
    """Unit rows around ``centres`` random directions (noise of norm ~0.6), built in float32 chunks."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x[s:s + m] = c[rng.integers(0, centres, m)] + rng.standard_normal((m, d), dtype=np.float32) * (0.6 / d ** 0.5)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def worker(case: dict) -> None:
    from metric_ds.pseudo_label import assign_by_knn, cluster_embeddings

    n, d, classes = case["N"], case["d"], case["classes"]
    x = clustered(n, d, classes, seed=0)
    base = harness.rss_bytes()
    start = time.perf_counter()
    if case["provider"] == "kmeans":
        out = cluster_embeddings(x, case["k"], seed=0)
        detail = f"k={case['k']} clusters"
    else:
        y = np.full(n, -1, dtype=np.int64)
        labelled = np.random.default_rng(1).choice(n, case["labelled"], replace=False)
        y[labelled] = np.random.default_rng(2).integers(0, classes, case["labelled"])
        out = assign_by_knn(x, y, classes, neighbours=10, margin=0.3).labels
        detail = f"{case['labelled']} labelled rows, 10 neighbours"
    wall = time.perf_counter() - start
    assert len(out) == n
    common = {**harness.common_fields("cpu"), "op": "pseudo_label_grouping", "provider": case["provider"],
              "mode": "full", "size": harness.size(N=n, d=d), "dtype": "fp32", "status": "ok"}
    note = f"{detail}; data {x.nbytes / 2**20:.0f} MiB; {case.get('note', '')}".strip("; ")
    harness.emit({**common, "metric": "time", "unit": "s", "p20": wall, "p50": wall, "p80": wall, "note": note})
    peak = harness.peak_rss_bytes() / 2**20
    harness.emit({**common, "metric": "peak_rss", "unit": "MiB", "p20": peak, "p50": peak, "p80": peak,
                  "note": f"{note}; of which above the data's RSS before the call: {peak - base / 2**20:.0f} MiB"})


CASES = {"kmeans:154": {"provider": "kmeans", "k": 154}, "kmeans:770": {"provider": "kmeans", "k": 770},
         "knn:7700": {"provider": "knn", "labelled": 7700}}


def read_rows() -> list[dict]:
    import csv

    if not CSV.exists():
        return []
    with CSV.open() as fh:
        return list(csv.DictReader(fh))


def render(rows: list[dict]) -> str:
    lines = ["| method | N | d | setting | time (s) | peak RSS (MiB) | note |",
             "| --- | ---: | ---: | --- | ---: | ---: | --- |"]
    for t in (r for r in rows if r.get("metric") == "time"):
        mem = next((r for r in rows if r.get("metric") == "peak_rss" and r["note"].startswith(t["note"])), {})
        lines.append(f"| {t['provider']} | {harness.dims(t)['N']} | {harness.dims(t)['d']} | {t['note'].split(';')[0]} | {float(t['p50']):.1f} "
                     f"| {float(mem.get('p50', 'nan')):.0f} | {mem.get('note', t['note'])} |")
    lines += [f"| {r['provider']} | {harness.dims(r).get('N', '')} | {harness.dims(r).get('d', '')} | | {r['status']} | | {r.get('note', '')} |"
              for r in rows if r.get("status", "ok") != "ok"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES),
                   help="which cases to run; rows of other cases already in the CSV are kept")
    p.add_argument("--note", default="", help="recorded with each row (e.g. the machine's load)")
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    for name in args.cases:
        case = {**CASES[name], "N": args.rows, "d": args.dim, "classes": 77, "note": args.note,
                "size": harness.size(N=args.rows, d=args.dim)}
        got = harness.run_in_subprocess(Path(__file__), case, timeout=3600)
        print(got, flush=True)
        same = lambda r: r["provider"] == case["provider"] and harness.dims(r)["N"] == args.rows and (  # noqa: E731
            r["note"].split(";")[0] == got[0].get("note", "").split(";")[0])
        harness.write_csv([r for r in read_rows() if not same(r)] + got, CSV)
        harness.replace_between_markers(HERE / "README.md", "cluster", render(read_rows()))
    print(render(read_rows()))


if __name__ == "__main__":
    main()
