"""One optimizer step on a fixed global batch, split over however many ranks launched this script.

Run alone (W=1) or under ``torchrun --nproc_per_node 2`` (W=2); rank 0 saves the loss terms and every
parameter after the step, so a test can compare the two (tests/test_distributed.py).

    python tests/dist_worker.py --model DIR --out F.pt --stage 0 --impl reference --sizes 5,7
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from metric_ds import distributed as D  # noqa: E402
from metric_ds.config import validate_config  # noqa: E402
from metric_ds.ds_config import build_ds_config  # noqa: E402
from metric_ds.losses import JointLoss, TermWindow  # noqa: E402
from metric_ds.model import MetricClassifier  # noqa: E402
from metric_ds.views import forward_view, view_inputs  # noqa: E402


def global_batch(n: int, seed: int = 0, no_metric_rows_before: int = 0,
                 label_free_from: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, 10), generator=g)
    ids[:, 0] = 101
    labels = torch.randint(0, 3, (n,), generator=g)
    metric = torch.rand(n, generator=g) < 0.8
    metric[:no_metric_rows_before] = False
    classifier = torch.rand(n, generator=g) < 0.7
    if label_free_from is not None:  # every third row from there on is label-free (SupCon with its second view)
        free = (torch.arange(n) % 3 == 1) & (torch.arange(n) >= label_free_from)
        labels[free], metric[free], classifier[free] = -1, True, False
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "metric_mask": metric, "classifier_mask": classifier}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--impl", default="reference")
    p.add_argument("--sizes", default="6,6", help="rows per rank when W=2 (the global batch is their sum)")
    p.add_argument("--no-metric-rank0", action="store_true", help="rank 0's rows have no metric_mask")
    p.add_argument("--scope", default="global")
    p.add_argument("--label-free-from", type=int, default=None,
                   help="make every third row from this global row on label-free")
    args = p.parse_args()

    import deepspeed
    from transformers import AutoModel

    D.init_process_group()
    sizes = [int(s) for s in args.sizes.split(",")]
    n = sum(sizes)
    w, r = D.world_size(), D.rank()
    batch = global_batch(n, no_metric_rows_before=sizes[0] if args.no_metric_rank0 else 0,
                         label_free_from=args.label_free_from)
    if w > 1:
        assert w == len(sizes)
        start = sum(sizes[:r])
        batch = {k: v[start:start + sizes[r]] for k, v in batch.items()}

    torch.manual_seed(0)
    encoder = AutoModel.from_pretrained(args.model, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = MetricClassifier(encoder, num_classes=3, classifier_dropout=0.0)
    cfg = validate_config({
        "data": {"train_path": "unused"},
        "training": {"batch_size": max(sizes) if w > 1 else n, "gradient_clip_val": 0.0,
                     "supcon_impl": args.impl, "supcon_scope": args.scope},
        "optimizer": {"learning_rate": 1e-3, "weight_decay": 0.0},
        "deepspeed": {"zero_stage": args.stage},
    })
    # Plain SGD makes "parameters equal after the step" the same as "gradients equal": Adam would divide
    # noise-level gradients (e.g. of attention key biases, whose true gradient is 0) by their own size.
    ds_config = build_ds_config(cfg)
    ds_config.pop("optimizer", None)
    ds_config["zero_allow_untested_optimizer"] = True
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=ds_config)
    label_free = args.label_free_from is not None
    loss_fn = JointLoss(1.0, 1.0, 0.1, args.impl, args.scope, num_classes=3 if label_free else None,
                        label_free_weight=0.5)
    view = view_inputs(batch, engine.device) if label_free else None
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    terms = loss_fn(out.logits, out.z, batch["labels"], batch["classifier_mask"], batch["metric_mask"],
                    z_view=forward_view(engine, view))
    engine.backward(terms.backward_loss)
    engine.step()
    window = TermWindow(1.0, 1.0)
    window.add(terms)
    logged = window.read()
    module = engine.module
    if args.stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            params = {k: v.detach().clone() for k, v in module.named_parameters()}
    else:
        params = {k: v.detach().clone() for k, v in module.named_parameters()}
    if r == 0:
        torch.save({"terms": logged, "params": params}, args.out)
    D.shutdown()


if __name__ == "__main__":
    main()
