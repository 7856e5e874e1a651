"""The cost of label-free rows' second view: one ``contrastive_batch: micro`` optimizer step of MiniLM on 32
BANKING77 rows of which 0, 8 or 16 are label-free (the same tokens each time: only their labels and masks change).

    .venv/bin/python benchmarks/bench_label_free.py                 # 8 steps per case, 1 thread
    .venv/bin/python benchmarks/bench_label_free.py --steps 16 --threads 2

A label-free row's view is one more forward of those rows (and the backward through it), so the step should grow
by about the label-free share of the batch. Each case runs in a fresh process (harness.run_in_subprocess): the
bundled all-MiniLM-L6-v2 (77 classes, max_seq_length 64), fp32, DeepSpeed ZeRO 0, one process, the reference SupCon
(the contrast set is small). A step is the training loop's own (:class:`metric_ds.steps.MicroBatchStep`): forward,
the view's forward, the joint loss, backward and AdamW. Both the wall time and the process's CPU time
(``time.process_time``, fairer on a shared machine) are recorded, p50 of ``--steps`` steps after one warm-up.
Results: ``benchmarks/results/label_free_view.csv``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402

HERE = Path(__file__).resolve().parent
BANKING77 = Path(os.environ.get("BANKING77_DIR", HERE.parent / "data" / "banking77"))
ROWS = 32


def run_case(case: dict) -> None:
    import deepspeed
    import pandas as pd

    from metric_ds import distributed as D
    from metric_ds.config import validate_config
    from metric_ds.data.collate import Collator, TextDataset
    from metric_ds.data.labels import LABEL_FREE, LabelMap
    from metric_ds.ds_config import build_ds_config
    from metric_ds.losses import JointLoss
    from metric_ds.model import MetricClassifier, load_encoder
    from metric_ds.steps import MicroBatchStep

    torch.set_num_threads(case["threads"])
    df = pd.read_csv(BANKING77 / "train.csv").sample(ROWS, random_state=0).rename(columns={"category": "label"})
    labels = LabelMap.from_labels(pd.read_csv(BANKING77 / "train.csv")["category"])
    df = df.assign(label_id=labels.encode(df["label"]), metric_mask=1, classifier_mask=1)
    D.init_process_group()
    encoder, tokenizer = load_encoder(None)
    torch.manual_seed(0)
    model = MetricClassifier(encoder, labels.num_classes)
    cfg = validate_config({"data": {"train_path": "unused"}, "training": {"batch_size": ROWS}})
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=2e-5),
                                      config=build_ds_config(cfg))
    step = MicroBatchStep(engine, JointLoss(supcon_impl="reference", num_classes=labels.num_classes), cfg)
    ds = TextDataset.from_frame(df, tokenizer, 64)
    batch = Collator(tokenizer)([ds[i] for i in range(ROWS)])
    free = case["label_free"]
    batch["labels"][:free], batch["classifier_mask"][:free] = LABEL_FREE, False
    engine.train()
    base = {**harness.common_fields("cpu"), "op": "label_free_view", "provider": f"{free} label-free",
            "mode": "step", "size": harness.size(rows=ROWS, label_free=free), "dtype": "fp32", "status": "ok"}
    for metric, clock in (("time", time.perf_counter), ("cpu_time", time.process_time)):
        p20, p50, p80 = harness.quantiles(harness.time_it(lambda: step(batch, 1, True, False), reps=case["steps"],
                                                          warmup=1, clock=clock))
        harness.emit({**base, "metric": metric, "unit": "s", "p20": p20, "p50": p50, "p80": p80})
    D.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results" / "label_free_view.csv")
    args = harness.parse_or_work(p, run_case)
    if args is None:
        return
    rows = []
    for free in (0, 8, 16):
        case = {"label_free": free, "steps": args.steps, "threads": args.threads, "provider": f"{free} label-free",
                "size": harness.size(rows=ROWS, label_free=free)}
        got = harness.run_in_subprocess(Path(__file__), case, timeout=1800)
        rows += got
        print(got, flush=True)
    harness.write_csv(rows, args.out)
    by = {(harness.dims(r).get("label_free"), r.get("metric")): r for r in rows if r.get("status", "ok") == "ok"}
    lines = ["| label-free rows of 32 | step (s, wall) | step (s, CPU) | CPU time vs none |",
             "| ---: | ---: | ---: | ---: |"]
    for free in (0, 8, 16):
        wall, cpu, none = by.get((free, "time")), by.get((free, "cpu_time")), by.get((0, "cpu_time"))
        if wall and cpu and none:
            lines.append(f"| {free} | {float(wall['p50']):.3f} | {float(cpu['p50']):.3f} | "
                         f"{float(cpu['p50']) / float(none['p50']):.2f}x |")
        else:
            lines.append(f"| {free} | failed | | |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
