"""The open-set study: reject out-of-scope texts and place new classes, CE alone against CE + SupCon, on BANKING77.

    .venv/bin/python benchmarks/studies/open_set.py [--stage train|score|render|all] [--only 75_1 ...]

The standard open-intent protocol (Zhang et al., AAAI 2021): for each draw, a seeded share of the 77 classes is
"known". Both shipped recipes (``configs/banking77.yaml``, and the same with ``training.metric_loss_weight=0``,
unchanged otherwise) train on the known classes' rows of train.csv only, with a stratified 10% of those rows held
out as validation (checkpoint choice and calibration); test is all of test.csv, where the rows of unknown classes
are "unknown". Each score's threshold is chosen by ``metric-ds calibrate`` on the known-class validation rows
alone (reject at most 5% of them); no out-of-scope row is seen before the one test evaluation
(``metric-ds evaluate --unknown-label``).

New classes: at 75% known, 10 labelled train.csv rows of each unknown class join the bank (the known classes'
training rows), and ``LoadedModel.knn`` labels the unknown classes' test rows; no retraining.

Results accumulate in ``benchmarks/results/open_set.json`` (a step already done is skipped unless ``--force``)
and are rendered to ``benchmarks/results/open_set.md``. Data: ``$BANKING77_DIR`` (default ``data/banking77``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
OUT_JSON, OUT_MD = RESULTS / "open_set.json", RESULTS / "open_set.md"
WORK = ROOT / "demo_runs" / "open_set"
DATA = Path(os.environ.get("BANKING77_DIR", ROOT / "data" / "banking77"))
PY = sys.executable
CONFIG = "configs/banking77.yaml"
TRAIN_SEED = 42  # the shipped recipe's seed
VAL_RATIO = 0.1
NEW_CLASS_ROWS = 10  # labelled rows per unknown class added to the bank
UNKNOWN = "unknown"

# draw name -> (share of the 77 classes known, the draw's seed): two draws per ratio, in the order they run
DRAWS = {"75_1": (0.75, 1), "75_2": (0.75, 2), "50_1": (0.50, 1), "25_1": (0.25, 1), "50_2": (0.50, 2),
         "25_2": (0.25, 2)}
RECIPES = {"ce_supcon": ([], "CE + SupCon (configs/banking77.yaml)"),
           "ce_only": (["training.metric_loss_weight=0"], "CE alone (the same, metric_loss_weight 0)")}
SCORES = ("msp", "knn", "centroid")

PUBLISHED = [  # BERT-base, same protocol: accuracy / macro-F1 over N + 1 classes at 25, 50, 75% known
    ("ADB (Zhang et al., AAAI 2021)", {"25": (78.85, 71.62), "50": (78.86, 80.90), "75": (81.08, 85.96)}),
    ("Metric learning + ADB (Lorenc et al., 2022)", {"25": (85.71, 78.86), "50": (83.78, 84.93),
                                                      "75": (84.40, 88.39)}),
]


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True, cwd=ROOT)


def load_results() -> dict:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {"draws": {}, "machine": {}}


def save_results(results: dict) -> None:
    OUT_JSON.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def known_classes(ratio: float, seed: int, classes: list[str]) -> list[str]:
    """A seeded draw of ``round(ratio * 77)`` classes, in sorted order."""
    n = round(ratio * len(classes))
    rng = np.random.default_rng(seed)
    return sorted(rng.permutation(sorted(classes))[:n].tolist())


def prepare_draw(draw: str) -> dict[str, Path]:
    """The draw's tables: the known classes' train and validation rows, a new-class bank, and test (all rows)."""
    ratio, seed = DRAWS[draw]
    folder = WORK / "data"
    full, test = folder / "train_all.parquet", folder / "test.parquet"
    for src, dst in (("train.csv", full), ("test.csv", test)):
        if not dst.exists():
            run([PY, "-m", "metric_ds", "prepare", "--input", DATA / src, "--output", dst,
                 "--text-column", "text", "--label-column", "category"])
    paths = {k: folder / f"{draw}_{k}.parquet" for k in ("train", "val", "new_bank")}
    paths["test"] = test
    if all(p.exists() for p in paths.values()):
        return paths
    from metric_ds.data.split import stratified_split

    df = pd.read_parquet(full)
    known = known_classes(ratio, seed, df["label"].unique().tolist())
    kdf = df[df["label"].isin(known)].reset_index(drop=True)
    tr, va = stratified_split(kdf["label"].to_numpy(), VAL_RATIO, seed)
    kdf.iloc[tr].to_parquet(paths["train"], index=False)
    kdf.iloc[va].to_parquet(paths["val"], index=False)
    rng = np.random.default_rng([seed, 10])
    unknown = df[~df["label"].isin(known)]
    new = pd.concat([g.iloc[rng.permutation(len(g))[:NEW_CLASS_ROWS]] for _, g in unknown.groupby("label")])
    pd.concat([kdf.iloc[tr], new]).to_parquet(paths["new_bank"], index=False)
    (folder / f"{draw}_known.json").write_text(json.dumps(known, indent=1))
    return paths


def train(draw: str, recipe: str, force: bool) -> None:
    results = load_results()
    entry = results["draws"].setdefault(draw, {}).setdefault(recipe, {})
    run_dir = WORK / "runs" / f"{draw}_{recipe}"
    if "train_wall_s" in entry and (run_dir / "best").is_dir() and not force:
        return
    paths = prepare_draw(draw)
    sets = [f"run_name={draw}_{recipe}", f"checkpointing.checkpoints_dir={WORK / 'runs'}",
            f"data.train_path={paths['train']}", f"data.val_path={paths['val']}", f"training.seed={TRAIN_SEED}",
            *RECIPES[recipe][0]]
    start = time.time()
    run([PY, "-m", "metric_ds", "train", "--overwrite", "--config", CONFIG, *sum((["--set", s] for s in sets), [])])
    wall = time.time() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    results = load_results()  # re-read: another stage may have written meanwhile
    results["draws"].setdefault(draw, {})[recipe] = {
        "overrides": sets, "train_wall_s": round(wall, 1), "steps": summary["steps"],
        "best_metric": summary["best_metric"], "best_value": summary["best_value"], "best_step": summary["best_step"],
        "train_rows": len(pd.read_parquet(paths["train"])), "val_rows": len(pd.read_parquet(paths["val"]))}
    save_results(results)


def score(draw: str, recipe: str, force: bool) -> None:
    """Calibrate on the draw's validation rows, evaluate once on test, and (at 75%) place the new classes."""
    results = load_results()
    entry = results["draws"].get(draw, {}).get(recipe, {})
    if "open_set" in entry and not force:
        return
    best = WORK / "runs" / f"{draw}_{recipe}" / "best"
    paths = prepare_draw(draw)
    run([PY, "-m", "metric_ds", "calibrate", "--model", best, "--data", paths["val"], "--reference-data",
         paths["train"]])
    out = best.parent / "eval" / "test_open_set.json"
    run([PY, "-m", "metric_ds", "evaluate", "--model", best, "--data", paths["test"], "--unknown-label", UNKNOWN,
         "--output", out])
    ev = json.loads(out.read_text())
    calibration = json.loads((best / "open_set.json").read_text())
    found = {"calibration": calibration["calibration"], "thresholds": calibration["thresholds"],
             "open_set": ev["open_set"], "closed_accuracy_known": ev["open_set"]["closed_accuracy_known"],
             "closed_macro_f1_known": ev.get("macro_f1")}
    if DRAWS[draw][0] == 0.75:
        found["new_classes"] = new_classes(best, paths)
    results = load_results()
    results["draws"][draw][recipe].update(found)
    save_results(results)


def new_classes(best: Path, paths: dict[str, Path]) -> dict:
    """k-NN accuracy on the unknown classes' test rows, with 10 labelled rows of each in the bank."""
    import metric_ds

    model = metric_ds.load(best, device="cpu")
    bank_df = pd.read_parquet(paths["new_bank"])
    test = pd.read_parquet(paths["test"])
    test = test[~test["label"].isin(model.labels)]
    bank = model.build_bank(bank_df["text"], bank_df["label"])
    out = {"bank_rows": len(bank_df), "test_rows": len(test), "new_classes": int(test["label"].nunique())}
    for k in (10, 1):
        votes = model.knn(test["text"], bank, k=k)
        out[f"knn{k}_accuracy"] = float(np.mean(np.array(votes.labels, dtype=object) == test["label"].to_numpy()))
    return out


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def mean(values: list[float]) -> float:
    return float(np.mean(values))


def ratio_name(draw: str) -> str:
    return f"{round(100 * DRAWS[draw][0])}%"


def best_of(entry: dict) -> tuple[str, dict]:
    """The score with the highest open-set macro-F1 on test: an oracle's pick, reported as such."""
    name = max(SCORES, key=lambda s: entry["open_set"]["scores"][s]["macro_f1"])
    return name, entry["open_set"]["scores"][name]


def render(results: dict) -> str:
    draws = [d for d in DRAWS if all("open_set" in results["draws"].get(d, {}).get(r, {}) for r in RECIPES)]
    lines = ["# Open set on BANKING77: reject out-of-scope texts, place new classes", "",
             "The standard open-intent protocol (Zhang et al., AAAI 2021): a seeded share of the 77 classes is known; "
             "each recipe trains on the known classes' rows of train.csv only (a stratified 10% of them held out "
             "for validation: checkpoint choice and calibration); test is all 3,080 rows of test.csv, the rows of "
             "the other classes being \"unknown\". Model: the bundled all-MiniLM-L6-v2; recipes: "
             "`configs/banking77.yaml` (CE + SupCon) and the same with `training.metric_loss_weight=0` (CE alone), "
             "unchanged. Each score's threshold rejects at most 5% of the known-class validation rows "
             "(`open_set.reject_rate`, the default; `metric-ds calibrate`); no out-of-scope row is seen before the "
             "one evaluation on test (`metric-ds evaluate --unknown-label`). Script: "
             "`benchmarks/studies/open_set.py`.", "",
             f"Machine: {results['machine'].get('platform')}, {results['machine'].get('cpus')} cores, CPU, fp32.", ""]
    lines += ["## Open-intent metrics (test; accuracy and macro-F1 over the known classes + unknown)", "",
              "| known | draw | recipe | score | accuracy | macro-F1 | F1 known | F1 unknown | AUROC | FPR@95TPR | "
              "closed-set acc (known rows) |", "| --- | --- | --- | --- |" + " ---: |" * 7]
    for d in draws:
        for r in RECIPES:
            e = results["draws"][d][r]
            for sc in SCORES:
                m = e["open_set"]["scores"][sc]
                default = " (default)" if sc == e["open_set"]["default_score"] else ""
                lines.append(f"| {ratio_name(d)} | seed {DRAWS[d][1]} | {RECIPES[r][1].split(' (')[0]} | {sc}{default} | "
                             f"{pct(m['accuracy'])} | {pct(m['macro_f1'])} | {pct(m['f1_known'])} | "
                             f"{pct(m['f1_unknown'])} | {pct(m['auroc'])} | {pct(m['fpr_at_95_tpr'])} | "
                             f"{pct(e['closed_accuracy_known'])} |")
    lines += ["", "## Against the published anchors (BERT-base, 110M; ours: MiniLM, 22M)", "",
              "Mean over the draws of each ratio. \"default\" is `open_set.score` (knn), fixed before the study; "
              "\"best of three\" picks, per draw, the score with the highest test macro-F1: an oracle's choice, "
              "shown because the issue's target reads \"the best score\".", "",
              "| known | method | accuracy | macro-F1 |", "| --- | --- | ---: | ---: |"]
    verdicts = []
    for ratio in ("25", "50", "75"):
        ds = [d for d in draws if ratio_name(d) == f"{ratio}%"]
        if not ds:
            continue
        for name, table in PUBLISHED:
            acc, f1 = table[ratio]
            lines.append(f"| {ratio}% | {name} | {acc:.2f} | {f1:.2f} |")
        rows = {}
        for r in RECIPES:
            label = RECIPES[r][1].split(" (")[0]
            for kind in ("default", "best of three"):
                ms = [results["draws"][d][r]["open_set"]["scores"][results["draws"][d][r]["open_set"]["default_score"]]
                      if kind == "default" else best_of(results["draws"][d][r])[1] for d in ds]
                acc, f1 = 100 * mean([m["accuracy"] for m in ms]), 100 * mean([m["macro_f1"] for m in ms])
                rows[(r, kind)] = (acc, f1)
                lines.append(f"| {ratio}% | {label}, {kind} ({len(ds)} draw{'s' if len(ds) > 1 else ''}) | "
                             f"{acc:.2f} | {f1:.2f} |")
        acc, f1 = rows[("ce_supcon", "default")]
        adb = PUBLISHED[0][1][ratio]
        verdicts.append(f"- {ratio}% known, CE + SupCon default against ADB's {adb[0]:.2f} / {adb[1]:.2f}: "
                        f"{acc - adb[0]:+.2f} accuracy, {f1 - adb[1]:+.2f} macro-F1.")
        anchor = PUBLISHED[1][1][ratio]
        for kind in ("default", "best of three"):
            acc, f1 = rows[("ce_supcon", kind)]
            beat = acc > anchor[0] and f1 > anchor[1]
            verdicts.append(f"- {ratio}% known, CE + SupCon {kind}: {acc:.2f} / {f1:.2f} against metric learning + "
                            f"ADB's {anchor[0]:.2f} / {anchor[1]:.2f}: "
                            + ("beats it on both." if beat else
                               f"misses ({acc - anchor[0]:+.2f} accuracy, {f1 - anchor[1]:+.2f} macro-F1)."))
    lines += ["", "## CE + SupCon against CE alone (open-set macro-F1, test)", "",
              "| known | draw | score | CE alone | CE + SupCon | difference |", "| --- | --- | --- | ---: | ---: | ---: |"]
    diffs: dict[str, list[float]] = {sc: [] for sc in SCORES}
    for d in draws:
        for sc in SCORES:
            a = results["draws"][d]["ce_only"]["open_set"]["scores"][sc]["macro_f1"]
            b = results["draws"][d]["ce_supcon"]["open_set"]["scores"][sc]["macro_f1"]
            diffs[sc].append(100 * (b - a))
            lines.append(f"| {ratio_name(d)} | seed {DRAWS[d][1]} | {sc} | {pct(a)} | {pct(b)} | {100 * (b - a):+.2f} |")
    new = [d for d in draws if "new_classes" in results["draws"][d]["ce_supcon"]]
    if new:
        lines += ["", "## New classes without retraining (75% known)", "",
                  f"{NEW_CLASS_ROWS} labelled train.csv rows of each unknown class join the bank (the known classes' "
                  "training rows); `LoadedModel.knn` labels the unknown classes' test rows, voting over the whole bank "
                  "(known classes included).", "",
                  "| draw | new classes | test rows | recipe | k-NN accuracy (k = 10, the default) | k = 1 |",
                  "| --- | ---: | ---: | --- | ---: | ---: |"]
        for d in new:
            for r in RECIPES:
                n = results["draws"][d][r]["new_classes"]
                lines.append(f"| seed {DRAWS[d][1]} | {n['new_classes']} | {n['test_rows']} | "
                             f"{RECIPES[r][1].split(' (')[0]} | {pct(n['knn10_accuracy'])} | {pct(n['knn1_accuracy'])} |")
        nd = [100 * (results["draws"][d]["ce_supcon"]["new_classes"]["knn10_accuracy"]
                     - results["draws"][d]["ce_only"]["new_classes"]["knn10_accuracy"]) for d in new]
    lines += ["", "## Against the targets", ""] + verdicts
    lines.append("- CE + SupCon minus CE alone, open-set macro-F1, mean over all draws (and the draws where CE + "
                 "SupCon is ahead): " + ", ".join(f"{sc} {mean(v):+.2f} ({sum(x > 0 for x in v)} of {len(v)})"
                                                 for sc, v in diffs.items())
                 + ". Only where it is ahead on every draw is it a gain; elsewhere the mean is carried by single "
                 "draws (per-draw differences above).")
    if new:
        lines.append("- New classes, k-NN accuracy (k = 10) CE + SupCon minus CE alone: "
                     + ", ".join(f"{x:+.2f}" for x in nd) + " points over the 75% draws.")
    lines += ["", "## Reading it", "",
              "- The scores rank well (AUROC 86-94; knn's the highest on every draw and recipe), but one threshold per score, set "
              "to reject 5% of known validation rows, is a single operating point chosen without out-of-scope data. "
              "Where most of the test is unknown (50% and 75% of it at 50% and 25% known), the unknown rows it "
              "accepts (FPR@95TPR) cost accuracy over N + 1 classes; ADB-style methods learn a boundary per class. "
              "A user who has out-of-scope examples can set `open_set.reject_rate` (or `calibrate --reject-rate`) "
              "for their traffic; the study does not, since that would choose on test.",
              "- knn beats msp on open-set macro-F1 on every draw and recipe, centroid on all but one (25%, seed 2, "
              "CE alone); centroid gains most from SupCon (ahead of CE alone on every draw), in line with SupCon's "
              "pull of each class toward one cluster.",
              "- New classes from 10 labelled rows: k = 10 lets the known classes' rows outvote the 10 rows of a new "
              "class; k = 1 places about 70% of them. SupCon does not help here (k = 10: behind CE alone on both "
              "draws)."]
    lines += ["", "## Notes", "",
              "- Train wall times (this machine, shared with other jobs): "
              + ", ".join(f"{d} {r} {results['draws'][d][r]['train_wall_s'] / 60:.1f} min" for d in draws for r in RECIPES)
              + ".",
              "- Draws per ratio: " + ", ".join(
                  f"{r} {sum(ratio_name(d) == r for d in draws)}" for r in ("25%", "50%", "75%"))
              + "; each draw is one sample of classes, and the test set one sample of rows (+-0.8 points of "
              "accuracy per run).",
              "- Each configuration was evaluated once on test; nothing was chosen on test (the default score and "
              "the 5% reject rate were set before the study)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["train", "score", "render", "all"], default="all")
    ap.add_argument("--only", nargs="*", default=list(DRAWS), choices=list(DRAWS))
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    results = load_results()
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    save_results(results)
    for draw in args.only:
        if args.stage in ("train", "all"):
            for recipe in RECIPES:
                train(draw, recipe, args.force)
        if args.stage in ("score", "all"):
            for recipe in RECIPES:
                score(draw, recipe, args.force)
    if args.stage in ("render", "all"):
        OUT_MD.write_text(render(load_results()))
        print(f"wrote {OUT_MD}")


if __name__ == "__main__":
    main()
