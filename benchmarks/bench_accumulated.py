"""A contrastive batch of 1024 rows on CPU: one micro-batch of 1024 (``contrastive_batch: micro``) against 16
micro-batches of 64 (``contrastive_batch: accumulated``, gradient caching), both one optimizer step.

    .venv/bin/python benchmarks/bench_accumulated.py                # MiniLM, BANKING77 texts, 3 steps each
    .venv/bin/python benchmarks/bench_accumulated.py --rows 256 --micro 32 --steps 2

Each configuration runs in a fresh process (harness.run_in_subprocess), so its peak RSS is its own: the model,
the optimizer, the batch's activations. The model is the bundled all-MiniLM-L6-v2 (77 classes, max_seq_length
64) on the first ``--rows`` sentences of BANKING77's train.csv with their labels; fp32, DeepSpeed ZeRO 0, one
process. A step is forward(s), the joint loss (CE + SupCon, fused op), backward(s) and AdamW; the step time is the
p50 of ``--steps`` steps after one warm-up step. The ratio of the two step times is the cost of the second
forward. Results: ``benchmarks/results/accumulated_ROWS.csv`` and a table per size in ``benchmarks/README.md``.
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


def run_case(case: dict) -> None:
    import deepspeed
    import pandas as pd

    from metric_ds import distributed as D
    from metric_ds.config import validate_config
    from metric_ds.data.collate import Collator, TextDataset
    from metric_ds.data.labels import LabelMap
    from metric_ds.ds_config import build_ds_config
    from metric_ds.grad_cache import accumulated_step
    from metric_ds.losses import JointLoss
    from metric_ds.model import MetricClassifier, load_encoder, model_inputs

    rows, micro = case["rows"], case["micro"]
    accumulation = rows // micro
    df = pd.read_csv(BANKING77 / "train.csv").head(rows).rename(columns={"category": "label"})
    labels = LabelMap.from_labels(df["label"])
    df = df.assign(label_id=labels.encode(df["label"]), metric_mask=1, classifier_mask=1)
    D.init_process_group()
    encoder, tokenizer = load_encoder(None)
    torch.manual_seed(0)
    model = MetricClassifier(encoder, labels.num_classes)
    cfg = validate_config({"data": {"train_path": "unused"},
                           "training": {"batch_size": micro, "gradient_accumulation_steps": accumulation}})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=build_ds_config(cfg))
    loss_fn = JointLoss(num_classes=labels.num_classes)
    ds = TextDataset.from_frame(df, tokenizer, 64)
    collate = Collator(tokenizer)
    batches = [collate([ds[i] for i in range(s, s + micro)]) for s in range(0, rows, micro)]
    engine.train()

    def step() -> None:
        if case["provider"] == "accumulated":
            accumulated_step(engine, loss_fn, batches)
            return
        engine.set_gradient_accumulation_boundary(True)
        out = engine(**model_inputs(batches[0]))
        b = batches[0]
        terms = loss_fn(out.logits, out.z, b["labels"], b["classifier_mask"], b["metric_mask"])
        engine.backward(terms.backward_loss)
        engine.step()

    times = harness.time_it(step, reps=case["steps"], warmup=1)
    p20, p50, p80 = harness.quantiles(times)
    base = {**harness.common_fields("cpu"), "op": "contrastive_batch", "provider": case["provider"], "mode": "step",
            "size": harness.size(rows=rows, micro=micro), "dtype": "fp32", "status": "ok",
            "note": f"{accumulation} x {micro} rows"}
    harness.emit({**base, "metric": "time", "unit": "s", "p20": p20, "p50": p50, "p80": p80})
    peak = harness.peak_rss_bytes() / 2**20
    harness.emit({**base, "metric": "peak_rss", "unit": "MiB", "p20": peak, "p50": peak, "p80": peak})
    D.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024, help="the contrastive batch")
    p.add_argument("--micro", type=int, default=64, help="micro-batch rows of the accumulated configuration")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="default: results/accumulated_ROWS.csv")
    args = harness.parse_or_work(p, run_case)
    if args is None:
        return
    rows = []
    for provider, micro in (("micro", args.rows), ("accumulated", args.micro)):
        case = {"provider": provider, "rows": args.rows, "micro": micro, "steps": args.steps,
                "size": harness.size(rows=args.rows, micro=micro)}
        got = harness.run_in_subprocess(Path(__file__), case, timeout=3600)
        rows += got
        print(got, flush=True)
    harness.write_csv(rows, args.out or HERE / "results" / f"accumulated_{args.rows}.csv")
    by = {(r["provider"], r.get("metric")): r for r in rows}
    lines = ["| configuration | step time (s) | peak RSS (MiB) |", "| --- | ---: | ---: |"]
    for provider in ("micro", "accumulated"):
        t, m = by.get((provider, "time")), by.get((provider, "peak_rss"))
        label = f"1 x {args.rows} (micro)" if provider == "micro" else f"{args.rows // args.micro} x {args.micro} (accumulated)"
        lines.append(f"| {label} | {float(t['p50']):.2f} | {float(m['p50']):.0f} |" if t and m else f"| {label} | failed | |")
    t_micro, t_acc = by.get(("micro", "time")), by.get(("accumulated", "time"))
    if t_micro and t_acc:
        lines.append(f"\nAccumulated / micro step time: {float(t_acc['p50']) / float(t_micro['p50']):.2f}x "
                     "(the second forward).")
    table = "\n".join(lines)
    print(table)
    harness.replace_between_markers(HERE / "README.md", f"accumulated-{args.rows}", table)


if __name__ == "__main__":
    main()
