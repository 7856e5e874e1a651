"""Cost of the cross-rank SupCon gather on CPU (gloo): its share of a training step at W=2.

    .venv/bin/torchrun --nproc_per_node 2 benchmarks/bench_gather.py [--batch 32] [--steps 8]

Each rank runs the bundled MiniLM on `--batch` rows per step (forward, JointLoss, backward, optimizer step) with
``supcon_scope: global``, timing separately the collectives that the global scope adds (the row-count gather and
the embedding/label gathers with autograd, forward and backward). Rank 0 prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from metric_ds import distributed as D  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seq", type=int, default=24)
    args = p.parse_args()
    import deepspeed

    from metric_ds.config import validate_config
    from metric_ds.ds_config import build_ds_config
    from metric_ds.losses import JointLoss
    from metric_ds.model import MetricClassifier, load_encoder

    D.init_process_group()
    encoder, _ = load_encoder(None)
    model = MetricClassifier(encoder, 77)
    cfg = validate_config({"data": {"train_path": "unused"}, "training": {"batch_size": args.batch}})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=build_ds_config(cfg))
    loss_fn = JointLoss(1.0, 1.0, 0.1, "auto", "global")
    g = torch.Generator().manual_seed(D.rank())
    gather_s, step_s = 0.0, 0.0
    original = D.gather_rows

    def timed_gather(*a, **k):
        nonlocal gather_s
        start = time.perf_counter()
        out = original(*a, **k)
        gather_s += time.perf_counter() - start
        return out

    D.gather_rows = timed_gather
    for step in range(args.steps + 1):
        ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=g)
        labels = torch.randint(0, 77, (args.batch,), generator=g)
        mask = torch.ones(args.batch, dtype=torch.bool)
        if step == 1:  # step 0 is warm-up
            gather_s, step_s = 0.0, 0.0
        start = time.perf_counter()
        out = engine(input_ids=ids, attention_mask=torch.ones_like(ids))
        terms = loss_fn(out.logits, out.z, labels, mask, mask)
        engine.backward(terms.backward_loss)
        engine.step()
        step_s += time.perf_counter() - start
    # the backward of the autograd gather runs inside engine.backward: time it alone on the same shapes
    z = torch.randn(args.batch, 384, requires_grad=True)
    start = time.perf_counter()
    for _ in range(args.steps):
        gathered = original(z, [args.batch] * D.world_size(), with_grad=True)
        gathered.sum().backward()
    gather_bwd_s = time.perf_counter() - start
    if D.is_main():
        per_step = step_s / args.steps
        gather = (gather_s + gather_bwd_s) / args.steps
        print(json.dumps({"world_size": D.world_size(), "batch_per_rank": args.batch, "seq": args.seq,
                          "step_s": round(per_step, 4), "gather_s": round(gather, 5),
                          "gather_share": round(gather / per_step, 5)}))
    D.shutdown()


if __name__ == "__main__":
    main()
