"""How much length-sorted batches speed up ``metric-ds evaluate``: BANKING77's test set, the bundled MiniLM.

The model is the untrained MiniLM with fresh heads, exported as ``best/`` would be (speed does not depend on
the weights). Runs alternate sorted / unsorted so that a change in the machine's load hits both alike.

    python benchmarks/bench_eval_sort.py --data data/banking77/test.csv --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_export(out: Path, data: Path) -> Path:
    """Prepare ``data`` with ``metric-ds prepare`` and export the untrained MiniLM with heads for its labels."""
    from metric_ds.artifact import save_model
    from metric_ds.data.io import read_table
    from metric_ds.data.labels import LabelMap
    from metric_ds.data.prepare import prepare
    from metric_ds.model import MetricClassifier, load_encoder

    table = out / "test.parquet"
    prepare(data, table, text_column="text", label_column="category")
    label_map = LabelMap.from_labels(read_table(table)["label"])
    encoder, tokenizer = load_encoder(None)
    torch.manual_seed(0)
    model = MetricClassifier(encoder, label_map.num_classes)
    save_model(out / "best", model, tokenizer, label_map=label_map)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data/banking77/test.csv"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from metric_ds.commands.evaluate import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        table = build_export(Path(tmp), Path(args.data))
        times: dict[str, list[float]] = {"sorted": [], "unsorted": []}
        accs = {}
        for _ in range(args.repeats):
            for name in times:
                t0 = time.perf_counter()
                res = evaluate(Path(tmp) / "best", table, batch_size=args.batch_size, device=args.device,
                               length_sorted=name == "sorted")
                times[name].append(time.perf_counter() - t0)
                print(f"{name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
                accs[name] = res["accuracy"]
    assert accs["sorted"] == accs["unsorted"], accs  # same predictions in the same order
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({"rows": res["rows"], "batch_size": args.batch_size, "device": args.device,
                      "threads": torch.get_num_threads(), "load_avg": os.getloadavg(), "times_s": times,
                      "best_s": best, "speedup": best["unsorted"] / best["sorted"]}, indent=1))


if __name__ == "__main__":
    main()
