"""Inference throughput on CPU: the ONNX export under ONNX Runtime against the same model in PyTorch.

    .venv/bin/python benchmarks/bench_onnx.py                  # batch 1 and 64, BANKING77's test sentences
    .venv/bin/python benchmarks/bench_onnx.py --batch-sizes 1 8 64 --threads 2

The model is the bundled all-MiniLM-L6-v2 as BANKING77 trains it (mean pooling, no projection, 77 classes,
max_seq_length 64) with untrained heads: throughput does not depend on the weights' values. It is exported once
with ``metric_ds.artifact.save_model`` and ``metric_ds.export.export_onnx`` into a temporary folder. Each
(provider, batch size) runs in a fresh process on the first ``--texts`` sentences of ``test.csv`` in file order
(so batches mix lengths, padded to their longest), tokenisation included, both outputs (logits and embedding)
computed; one rep is one pass over those texts, and texts/s = texts / the pass's wall time. Results:
``benchmarks/results/onnx.csv`` and the table in ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402

HERE = Path(__file__).resolve().parent
PROVIDERS = ["pytorch", "onnxruntime"]
NUM_CLASSES = 77
MAX_SEQ_LENGTH = 64
BANKING77 = Path(os.environ.get("BANKING77_DIR", HERE.parent / "data" / "banking77"))


def build_exports(work: Path) -> tuple[Path, Path]:
    """The untrained MiniLM classifier as an export folder and as ONNX."""
    from metric_ds.artifact import save_model
    from metric_ds.data.labels import LabelMap
    from metric_ds.export import export_onnx
    from metric_ds.model import MetricClassifier, load_encoder

    encoder, tokenizer = load_encoder(None)
    torch.manual_seed(0)
    model = MetricClassifier(encoder, NUM_CLASSES, "mean", None).eval()
    save_model(work / "best", model, tokenizer, label_map=LabelMap(range(NUM_CLASSES)),
               config={"training": {"max_seq_length": MAX_SEQ_LENGTH}})
    diffs = export_onnx(work / "best", work / "onnx", max_seq_length=MAX_SEQ_LENGTH)
    print(f"exported; ONNX Runtime vs PyTorch: {diffs}", flush=True)
    return work / "best", work / "onnx"


def _predict_fn(case: dict):
    """``fn(texts) -> (logits, embedding)`` for the case's provider, tokenisation included."""
    from transformers import AutoTokenizer

    if case["provider"] == "pytorch":
        from metric_ds.artifact import load_model

        model, tokenizer = load_model(case["best"])

        def run(texts: list[str]):
            enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt")
            with torch.inference_mode():
                out = model(**enc)
            return out.logits, out.z

        return run
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = case["threads"]
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(Path(case["onnx"]) / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(case["onnx"])
    names = [i.name for i in session.get_inputs()]

    def run(texts: list[str]):
        enc = tokenizer(texts, padding=True, truncation=True, return_tensors="np")
        return session.run(["logits", "embedding"], {k: enc[k] for k in names})

    return run


def run_case(case: dict) -> None:
    """Worker: one (provider, batch size) in this fresh process; prints RESULT rows."""
    import pandas as pd

    torch.set_num_threads(case["threads"])
    texts = pd.read_csv(BANKING77 / "test.csv")["text"].astype(str).tolist()[: case["texts"]]
    b = case["B"]
    batches = [texts[i:i + b] for i in range(0, len(texts), b)]
    run = _predict_fn(case)

    def one_pass() -> None:
        for batch in batches:
            run(batch)

    times = harness.time_it(one_pass, case["reps"], warmup=1)
    p20, p50, p80 = harness.quantiles([len(texts) / t for t in times])
    harness.emit({**harness.common_fields("cpu"), "op": "classify+embed", "provider": case["provider"],
                  "mode": "inference", "metric": "throughput", "unit": "texts/s",
                  "size": harness.size(B=b, d=384), "dtype": "fp32", "p20": p20, "p50": p50, "p80": p80, "status": "ok",
                  "note": f"{len(texts)} BANKING77 test texts, max_seq_length {MAX_SEQ_LENGTH}; {case['note']}"})


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    p.add_argument("--texts", type=int, default=512, help="how many test.csv sentences one rep encodes")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--note", default="", help="machine conditions, recorded in each row (e.g. the load)")
    p.add_argument("--out", default=str(HERE / "results" / "onnx.csv"))
    p.add_argument("--timeout", type=float, default=1800)
    args = harness.parse_or_work(p, run_case)
    if args is None:
        return
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_onnx-") as tmp:
        best, onnx_dir = build_exports(Path(tmp))
        for b in args.batch_sizes:
            for provider in args.providers:
                case = {"provider": provider, "B": b, "texts": args.texts, "reps": args.reps,
                        "threads": args.threads, "best": str(best), "onnx": str(onnx_dir), "note": args.note}
                for r in harness.run_in_subprocess(Path(__file__), case, args.timeout):
                    r = {**harness.common_fields("cpu"), "op": "classify+embed", "mode": "inference",
                         "metric": "throughput", "unit": "texts/s", "size": harness.size(B=b, d=384), "dtype": "fp32",
                         **r}
                    rows.append(r)
                    shown = f"{float(r['p50']):.1f} texts/s" if r.get("status") == "ok" else r.get("status")
                    print(f"{provider:>12} batch {b:>3}: {shown}", flush=True)
    harness.write_csv(rows, Path(args.out))
    speedups = []
    for b in args.batch_sizes:
        by = {r["provider"]: float(r["p50"]) for r in rows if harness.dims(r)["B"] == b and r.get("status") == "ok"}
        if len(by) == 2:
            speedups.append(f"batch {b}: x{by['onnxruntime'] / by['pytorch']:.2f}")
    text = "\n\n".join([
        f"Device: {harness.device_name('cpu')}; torch {torch.__version__}; onnxruntime {_ort_version()}; "
        f"{args.threads} threads for both "
        f"providers; fp32; {args.texts} BANKING77 test sentences per rep, {args.reps} reps. {args.note}",
        harness.markdown_table(rows, "throughput", "texts/s"),
        "ONNX Runtime / PyTorch: " + ", ".join(speedups) + ".",
    ])
    harness.replace_between_markers(HERE / "README.md", "onnx", text)
    print(f"wrote {args.out} and benchmarks/README.md")


if __name__ == "__main__":
    main()
