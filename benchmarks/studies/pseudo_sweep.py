"""How coverage trades against precision in `metric-ds pseudo-label`, per method and threshold, on the
limited-labelling study's draws.

For one draw of ``benchmarks/studies/limited_labels.py`` (its ``pl_input`` and ``gold`` tables must exist), embed every
row once with the bundled MiniLM or a trained run's ``best/`` (cached beside the draw), then run both methods over
a grid of thresholds with the package's own functions (:mod:`metric_ds.pseudo_label`). Each setting reports:

* coverage: the share of unlabelled rows that get a label;
* the estimated precision: held-out labelled rows, no gold label (what a user sees and may choose on);
* the true precision: gold labels of the unlabelled rows, read after the fact (what a user never sees);
* correct and wrong pseudo-labels, counted with the gold labels.

Choose a setting on the estimate, never on the true column: the true column exists only to show how far the
estimate can be trusted. Writes ``benchmarks/results/pseudo_sweep.{md,json}`` (one section per draw and model).

    python benchmarks/studies/pseudo_sweep.py --k 10 --draw 0 [--model demo_runs/limited/k10_draw0/runs/c/best]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import banking77 as b77  # noqa: E402
import limited_labels as ll  # noqa: E402

from metric_ds.pseudo_label import (  # noqa: E402
    assign_by_clusters,
    assign_by_knn,
    cluster_embeddings,
    embed_texts,
    estimate_precision,
    load_embedder,
)

RESULTS_JSON = b77.RESULTS / "pseudo_sweep.json"
K_MULTIPLES, PURITIES = (1, 2, 4), (0.6, 0.8, 1.0)  # k-means: k = multiple x classes; min_labelled 2
KNN_GRID = [(n, g) for n in (5, 10) for g in (0.1, 0.3, 0.5)]  # (neighbours, margin)
HOLDOUT, SEED, MIN_LABELLED = 0.2, 0, 2  # the command's defaults


def embeddings(work: Path, texts: list[str], model: Path | None) -> tuple[np.ndarray, float]:
    """Unit-norm embeddings of ``texts`` (cached as ``.npy`` in the draw's folder) and the seconds they took."""
    tag = "minilm" if model is None else model.parent.name + "_" + model.name
    cache = work / f"emb_{tag}.npy"
    if cache.exists():
        return np.load(cache), 0.0
    start = time.time()
    x = embed_texts(load_embedder(model), texts, batch_size=128, max_seq_length=64)
    np.save(cache, x)
    return x, time.time() - start


def score(labels: np.ndarray, y: np.ndarray, truth: np.ndarray) -> dict:
    """Coverage and true precision of an assignment over the unlabelled rows."""
    unl = y < 0
    got = unl & (labels >= 0)
    correct = int((labels[got] == truth[got]).sum())
    return {"coverage": float(got.sum() / unl.sum()), "pseudo": int(got.sum()), "correct": correct,
            "wrong": int(got.sum()) - correct, "true_precision": correct / got.sum() if got.any() else None}


def sweep(k: int, draw: int, model: Path | None) -> dict:
    work = ll.WORK / f"k{k}_draw{draw}"
    src, gold = pd.read_parquet(work / "pl_input.parquet"), pd.read_parquet(work / "gold.parquet")["label"]
    classes = sorted(gold.astype(str).unique())
    index = {c: i for i, c in enumerate(classes)}
    truth = gold.astype(str).map(index).to_numpy()
    y = np.where(src["label"].isna(), -1, src["label"].astype(str).map(index).fillna(-1)).astype(np.int64)
    x, embed_s = embeddings(work, src["text"].tolist(), model)
    num_classes = len(classes)
    rows = []
    for multiple in K_MULTIPLES:
        clusters = cluster_embeddings(x, multiple * num_classes, SEED)  # one clustering per k, every purity
        for purity in PURITIES:
            def assign(labels: np.ndarray, c=clusters, p=purity):  # noqa: ANN001, ANN202
                return assign_by_clusters(c, labels, num_classes, p, MIN_LABELLED)
            est = estimate_precision(assign, y, HOLDOUT, SEED)
            rows.append({"method": "kmeans", "setting": f"k = {multiple}C, purity >= {purity}",
                         "estimated_precision": est["precision"], **score(assign(y).labels, y, truth)})
    for n, margin in KNN_GRID:
        def assign(labels: np.ndarray, n=n, g=margin):  # noqa: ANN001, ANN202
            return assign_by_knn(x, labels, num_classes, n, g)
        est = estimate_precision(assign, y, HOLDOUT, SEED)
        rows.append({"method": "knn", "setting": f"{n} neighbours, margin >= {margin}",
                     "estimated_precision": est["precision"], **score(assign(y).labels, y, truth)})
    return {"k": k, "draw": draw, "model": "bundled MiniLM (frozen)" if model is None else str(model),
            "rows": int(len(y)), "labelled": int((y >= 0).sum()), "embed_s": round(embed_s, 1), "settings": rows}


def render(results: dict) -> str:
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["# Pseudo-label coverage against precision", "",
             "`python benchmarks/studies/pseudo_sweep.py`: each draw of the limited-labelling study, embedded once, labelled "
             "by both methods of `metric-ds pseudo-label` over a grid of thresholds (min_labelled 2, 20% of the "
             "labelled rows held out for the estimate). *Estimated* needs no gold label (what a user can choose "
             "on); *true* reads the hidden gold labels after the fact and must never be used to choose.", ""]
    for key, r in results.items():
        if key.startswith("_"):
            continue
        lines += [f"## k = {r['k']}, draw {r['draw']}: {r['model']}", "",
                  f"{r['rows']} rows, {r['labelled']} labelled; embedding took {r['embed_s']} s (0: cached).", "",
                  "| method | setting | coverage | estimated precision | true precision | correct | wrong |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for s in r["settings"]:
            lines.append(f"| {s['method']} | {s['setting']} | {pct(s['coverage'])} | {pct(s['estimated_precision'])} | "
                         f"{pct(s['true_precision'])} | {s['correct']} | {s['wrong']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--draw", type=int, default=0)
    p.add_argument("--model", type=Path, default=None, help="a run's best/ (default: the bundled MiniLM)")
    args = p.parse_args()
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    key = f"k{args.k}/draw{args.draw}/" + ("minilm" if args.model is None else str(args.model))
    new = sweep(args.k, args.draw, args.model)
    if new["embed_s"] == 0 and key in results:  # embeddings from the cache: keep the time they took
        new["embed_s"] = results[key]["embed_s"]
    results[key] = new
    RESULTS_JSON.write_text(json.dumps(results, indent=2))
    (b77.RESULTS / "pseudo_sweep.md").write_text(render(results))
    print((b77.RESULTS / "pseudo_sweep.md").read_text())


if __name__ == "__main__":
    main()
