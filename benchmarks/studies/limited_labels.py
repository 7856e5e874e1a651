"""The limited-labelling study on BANKING77: do unverified (pseudo-labelled) rows in SupCon add accuracy over the
few verified rows?

    .venv/bin/python benchmarks/studies/limited_labels.py [--k 10 5] [--draws 0 1] [--rows a c e b] [--force]

Setup: train.csv; for each k (labelled rows per class) and draw (the seed of the draw), k rows per class are
labelled and every other row's label is hidden from every step. One labelled row per class is held out as the
validation table (the checkpoint is chosen on it, never on test); the other k - 1 train. The gold labels of the
unlabelled rows are read once, after pseudo-labelling, only to report the true precision beside the estimate.

Rows (``configs/limited_labels.yaml``; labelled-only rows with ``training.num_epochs=15``):

a. CE on the labelled rows alone;
b. naive self-training: CE on labelled + pseudo-labelled rows (classifier_mask = 1 on all);
c. the product: CE on the labelled rows + SupCon on labelled and pseudo-labelled rows;
d. (c), round 2: pseudo-labels from (c)'s model (``pseudo-label --model RUN/best``);
e. CE + SupCon on the labelled rows only (no unlabelled data; SetFit-like);
f. the gold-label 10-shot row of ``banking77.json`` (SupCon sees the gold label of every row): an oracle;
g. (c) with label-free rows: the rows pseudo-label cannot place are kept (``--keep-unassigned``), each its own
   class in SupCon with a second dropout view of itself; g2 is its round 2 (pseudo-labels from (g)'s model);
h. SetFit (the peer), classic settings on the same k - 1 labelled rows (``setfit_peer.py``, under
   ``.venv-study`` from ``make study-venv``).

Results accumulate in ``benchmarks/results/limited_labels.json`` (a finished row is skipped unless ``--force``;
run any subset of rows and draws, in any order) and are rendered to ``limited_labels.md``. Every training and
evaluation goes through the ``metric-ds`` commands, with ``benchmarks/studies/banking77.py``'s helpers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import banking77 as b77  # noqa: E402  (the BANKING77 study's helpers: run, prepare, WORK, PY, RESULTS)

from metric_ds.data.prepare import classifier_subset, write_table  # noqa: E402
from metric_ds.pseudo_label import repeat_labelled  # noqa: E402

CONFIG = "configs/limited_labels.yaml"
WORK = b77.WORK.parent / "limited"
RESULTS_JSON = b77.RESULTS / "limited_labels.json"
LABELLED_ONLY_EPOCHS = 15
LABELLED_SHARE = 0.5  # labelled rows are repeated up to about this share of the joint table

ROWS = {
    "a": "CE on the k labelled rows alone",
    "b": "naive self-training: CE on labelled + pseudo-labelled rows (classifier_mask = 1 on all)",
    "c": "the product: CE on labelled rows + SupCon on labelled and pseudo-labelled rows",
    "d": "(c), round 2: pseudo-labels from (c)'s model",
    "e": "CE + SupCon on the labelled rows only (no unlabelled data; SetFit-like)",
    "f": "oracle: 10 labelled rows per class (CE) + SupCon on every row with its gold label",
    "g": "(c) + label-free rows: the rows pseudo-label cannot place, each its own class with a second dropout view",
    "g2": "(g), round 2: pseudo-labels from (g)'s model, unplaced rows kept label-free",
    "h": "SetFit 1.2 (peer): the k - 1 labelled rows, 20 pair iterations, 1 epoch, batch 16, logistic-regression head",
}
STUDY_PY = b77.ROOT / ".venv-study" / "bin" / "python"
ANCHORS = [("USE+ConveRT", 77.75, 85.19), ("DNNC", 80.40, 86.71), ("CPFT", 80.86, 87.20), ("ICDA", 84.01, 89.79)]


def draw(data_dir: Path, k: int, seed: int, out: Path) -> dict[str, Path]:
    """Write the draw's tables: ``val`` (one labelled row per class), ``labelled`` (the other k - 1, masks 1/1),
    ``pl_input`` (labelled rows + every other row with its label emptied) and ``gold`` (the hidden labels, in
    ``pl_input``'s row order, for the after-the-fact precision only)."""
    paths = {n: out / f"{n}.parquet" for n in ("val", "labelled", "pl_input", "gold")}
    if all(p.exists() for p in paths.values()):
        return paths
    raw = pd.read_csv(data_dir / "train.csv")
    df = pd.DataFrame({"text": raw["text"], "label": raw["category"].astype(str)})
    chosen = classifier_subset(df["label"].to_numpy(), None, k, seed).astype(bool)
    idx = np.flatnonzero(chosen)
    rng = np.random.default_rng([seed, 1])
    val_idx = np.sort([rng.choice(idx[df["label"].to_numpy()[idx] == c]) for c in sorted(df["label"].unique())])
    lab_idx = np.setdiff1d(idx, val_idx)
    unl_idx = np.flatnonzero(~chosen)
    masks = {"metric_mask": 1, "classifier_mask": 1}
    write_table(df.iloc[val_idx].assign(**masks).reset_index(drop=True), paths["val"])
    write_table(df.iloc[lab_idx].assign(**masks).reset_index(drop=True), paths["labelled"])
    pl = pd.concat([df.iloc[lab_idx], df.iloc[unl_idx].assign(label=None)], ignore_index=True)
    write_table(pl, paths["pl_input"])
    write_table(pd.concat([df.iloc[lab_idx], df.iloc[unl_idx]], ignore_index=True)[["label"]], paths["gold"])
    return paths


def pseudo_label(inp: Path, gold: Path, out: Path, model: Path | None = None, keep_unassigned: bool = False) -> dict:
    """Run ``metric-ds pseudo-label`` (default settings; ``keep_unassigned``: ``--keep-unassigned``) and add the
    true precision from the gold labels."""
    summary_path, wall_path = out.with_suffix(".summary.json"), out.with_suffix(".wall.json")
    if not out.exists():
        cmd = [b77.PY, "-m", "metric_ds", "pseudo-label", "--input", str(inp), "--output", str(out),
               "--summary", str(summary_path), "--max-seq-length", "64"]
        cmd += ["--model", str(model)] if model else []
        start = time.time()
        b77.run(cmd + (["--keep-unassigned"] if keep_unassigned else []))
        wall_path.write_text(json.dumps({"wall_s": round(time.time() - start, 1)}))
    summary = json.loads(summary_path.read_text())
    summary["wall_s"] = json.loads(wall_path.read_text())["wall_s"] if wall_path.exists() else None
    table, src, truth = pd.read_parquet(out), pd.read_parquet(inp), pd.read_parquet(gold)["label"].to_numpy()
    # pseudo rows keep the input order: walk the unlabelled input rows to find each one's gold label
    unl = np.flatnonzero(src["label"].isna().to_numpy())
    texts = src["text"].to_numpy()
    pseudo = table[table["source"] == "pseudo"]
    j, correct = 0, 0
    for text, label in zip(pseudo["text"], pseudo["label"]):
        while texts[unl[j]] != text:
            j += 1
        correct += truth[unl[j]] == label
        j += 1
    summary["true_precision"] = correct / len(pseudo) if len(pseudo) else None
    summary["classes_with_pseudo"] = sum(1 for v in summary["per_class"].values() if v["pseudo"])
    return summary


def score_on_test(run_dir: Path, test: Path, bank: Path) -> dict:
    """Evaluate ``run_dir/best`` once on test (k-NN against the labelled training rows only)."""
    ev_path = run_dir / "eval" / "test.json"
    b77.run([b77.PY, "-m", "metric_ds", "evaluate", "--model", str(run_dir / "best"), "--data", str(test),
             "--bank-data", str(bank), "--output", str(ev_path), "--max-seq-length", "64"])
    ev = json.loads(ev_path.read_text())
    return {"test_accuracy": ev.get("accuracy"), "test_macro_f1": ev.get("macro_f1"),
            "test_knn_acc": ev.get("retrieval", {}).get("knn_acc")}


def train_eval(name: str, run_root: Path, train: Path, val: Path, test: Path, bank: Path, sets: list[str],
               on_test: bool = True) -> dict:
    """Train with the recipe plus ``sets``, then (``on_test``) score ``best/`` once on test; a candidate of the
    recipe search (``on_test=False``) is judged on validation alone."""
    run_dir = run_root / name
    all_sets = [f"run_name={name}", f"checkpointing.checkpoints_dir={run_root}", f"data.train_path={train}",
                f"data.val_path={val}", *sets]
    start = time.time()
    b77.run([b77.PY, "-m", "metric_ds", "train", "--overwrite", "--config", CONFIG, *sum((["--set", s] for s in all_sets), [])])
    wall = time.time() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    by = next((x.split("=", 1)[1] for x in sets if x.startswith("checkpointing.save_best_by=")), "acc")
    result = {"overrides": all_sets, "run_dir": str(run_dir), "train_wall_s": round(wall, 1),
              "recipe": recipe_of(run_dir / "config.yaml"),
              "steps": summary["steps"], "best_step": summary["best_step"], "checkpoint_by": by,
              f"val_{by}": summary["best_value"], **b77.validation_at_best(run_dir, summary["best_step"])}
    return result | (score_on_test(run_dir, test, bank) if on_test else {})


RECIPE_KEYS = ("metric_loss_weight", "supcon_temperature", "label_free_weight")
# the recipe of the study's first rows (sessions 4-9), which ran before rows recorded their own
FIRST_RECIPE = {"metric_loss_weight": 0.5, "supcon_temperature": 0.1, "label_free_weight": 1.0}
SUPCON_ROWS = ("c", "d", "e", "g", "g2")  # the rows whose training the SupCon recipe changes (a and b set weight 0)
ROUND2 = {"d": "c", "g2": "g"}  # a round-2 row and the round-1 row whose model pseudo-labels for it


def recipe_of(config: Path) -> dict:
    """The SupCon keys of a config (a run's resolved ``config.yaml``, or the shipped recipe's): the shipped recipe
    changed during the study (``metric_loss_weight`` 0.5, then 0.25 once chosen on validation), so every row
    records its own."""
    from metric_ds.config import load_config

    training = load_config(config).training
    return {k: getattr(training, k) for k in RECIPE_KEYS}


def shipped_recipe() -> dict:
    """The SupCon keys of ``configs/limited_labels.yaml`` as it ships now."""
    return recipe_of(b77.ROOT / CONFIG)


def row_recipe(r: dict) -> dict:
    return r.get("recipe") or FIRST_RECIPE


def stale(r: dict, row: str, shipped: dict) -> bool:
    """Whether a SupCon row trained with another recipe than the shipped one (a round-2 row: or pseudo-labelled
    with a round-1 model that did)."""
    if row not in SUPCON_ROWS:
        return False
    if row_recipe(r) != shipped:
        return True
    return row in ROUND2 and r.get("round1_recipe", FIRST_RECIPE) != shipped


def weight_note(r: dict, row: str, shipped: dict) -> str:
    """`` (SupCon weight W)`` for a row that trained at another weight than the shipped recipe's; a round-2 row
    whose round-1 model did says so too."""
    if row not in SUPCON_ROWS or not r:
        return ""
    w = row_recipe(r)["metric_loss_weight"]
    if w != shipped["metric_loss_weight"]:
        return f" (SupCon weight {w:g})"
    r1 = r.get("round1_recipe", FIRST_RECIPE) if row in ROUND2 else shipped
    return f" (round 1 at SupCon weight {r1['metric_loss_weight']:g})" if r1 != shipped else ""


def setfit_row(train: Path, test: Path, seed: int, out: Path) -> dict:
    """Row h: SetFit on the labelled training rows, in the study environment (its wall time is its own)."""
    if not STUDY_PY.exists():
        raise SystemExit("row h runs SetFit, a study dependency: `make study-venv` first")
    result_path = out / "result.json"
    b77.run([str(STUDY_PY), str(Path(__file__).resolve().parent / "setfit_peer.py"), "--train", str(train),
             "--test", str(test), "--seed", str(seed), "--out", str(result_path)])
    return json.loads(result_path.read_text())


def run_row(row: str, k: int, seed: int, data_dir: Path, max_steps: int | None = None,
            checkpoint_by: str = "acc", candidate: str | None = None, round1: Path | None = None) -> dict:
    """Train and test one row. ``checkpoint_by="loss"``: the variant that keeps the checkpoint of least validation
    loss (run ``ROW_byloss``; row d then re-embeds with ``c_byloss``'s model). ``candidate`` (``KEY=VALUE``, a
    config override): a candidate of the recipe search, trained and judged on validation only (run
    ``ROW~KEY=VALUE``; its test score is read only if the search chooses it). ``round1``: the run folder of the
    round-1 row whose model pseudo-labels for a round-2 row (d, g2); by default its run of this draw."""
    out = WORK / f"k{k}_draw{seed}"
    paths = draw(data_dir, k, seed, out)
    _, test = b77.prepare(data_dir, "", [], 42)
    suffix = "" if checkpoint_by == "acc" else f"_by{checkpoint_by}"
    common = dict(run_root=out / "runs", val=paths["val"], test=test, bank=paths["labelled"])
    seed_set = [f"training.seed={seed}"] + ([f"training.max_steps={max_steps}"] if max_steps else [])
    if suffix:
        seed_set.append(f"checkpointing.save_best_by={checkpoint_by}")
    if candidate:
        if row in ("d", "g2", "h"):
            raise SystemExit(f"the recipe search trains rows a, b, c, e and g, not {row}")
        key, value = candidate.split("=", 1)
        suffix += f"-{key.split('.')[-1]}-{value}"  # the run folder: letters, digits, '.', '_', '-'
        seed_set.append(candidate)
        common["on_test"] = False
    if row == "h":
        return setfit_row(paths["labelled"], test, seed, out / "runs" / "h")
    if row in ("a", "e"):
        sets = seed_set + [f"training.num_epochs={LABELLED_ONLY_EPOCHS}"]
        if row == "a":
            sets.append("training.metric_loss_weight=0")
        return train_eval(row + suffix, train=paths["labelled"], sets=sets, **common)
    keep = row in ("g", "g2")  # label-free rows: pseudo-label --keep-unassigned
    name = "pseudo_keep" if keep else "pseudo"
    if row in ROUND2:
        first = ROUND2[row]
        model = (round1 or out / "runs" / f"{first}{suffix}") / "best"
        if not model.exists():
            raise SystemExit(f"row {row} needs row {first}{suffix} of k={k}, draw {seed} first ({model} is missing)")
        pl_path = out / f"{name}_round2{suffix}.parquet"
        pl = pseudo_label(paths["pl_input"], paths["gold"], pl_path, model, keep_unassigned=keep)
    else:
        pl_path = out / f"{name}.parquet"
        pl = pseudo_label(paths["pl_input"], paths["gold"], pl_path, keep_unassigned=keep)
    table, r = repeat_labelled(pd.read_parquet(pl_path), LABELLED_SHARE)
    sets = list(seed_set)
    if row == "b":
        table = table.assign(classifier_mask=1, metric_mask=0)
        sets.append("training.metric_loss_weight=0")
    train = out / f"train_{row}{suffix}.parquet"
    write_table(table, train)
    result = train_eval(row + suffix, train=train, sets=sets, **common)
    result.update(labelled_repeat=r, pseudo={key: pl[key] for key in ("pseudo_labelled", "unlabelled", "coverage",
                                                                       "true_precision")},
                  estimated_precision=pl["estimated_precision"]["precision"], pseudo_label_wall_s=pl["wall_s"],
                  label_free_rows=int((table["source"] == "unassigned").sum()))
    if row in ROUND2:
        result.update(round1_run=str(model.parent), round1_recipe=recipe_of(model.parent / "config.yaml"))
    return result


def pseudo_summaries() -> dict[str, dict]:
    """The pseudo-label summary (with its true precision) of every draw and round on disk, for the tables."""
    out = {}
    for work in sorted(WORK.glob("k*_draw*")):
        paths = {n: work / f"{n}.parquet" for n in ("pl_input", "gold")}
        for name, label in (("pseudo", "round 1"), ("pseudo_round2", "round 2"),
                            ("pseudo_keep_round2", "round 2 from (g)")):
            if (work / f"{name}.summary.json").exists() and all(p.exists() for p in paths.values()):
                k, d = work.name.split("_")
                out[f"{k}/{d} {label}"] = pseudo_label(paths["pl_input"], paths["gold"], work / f"{name}.parquet")
    return out


def oracle_row() -> dict | None:
    """Row f from ``banking77.json`` (measured there, not re-run)."""
    path = b77.RESULTS / "banking77.json"
    r = json.loads(path.read_text()).get("fewshot_ce_supcon") if path.exists() else None
    if r is None:
        return None
    return {"test_accuracy": r["test_accuracy"], "test_macro_f1": r["test_macro_f1"], "steps": r["steps"],
            "train_wall_s": r["train_wall_s"], "source": "benchmarks/results/banking77.json: fewshot_ce_supcon",
            "note": "one lr for all parameters, 3 epochs of configs/banking77.yaml, validation split of its own; "
                    "SupCon saw every row's gold label"}


def render(results: dict) -> str:
    meta = results.get("_meta", {})
    lines = ["# Limited labelling on BANKING77", "",
             "k labelled rows per class drawn from train.csv by seed (the draw); every other label hidden. One "
             "labelled row per class is the validation table (checkpoint choice); k - 1 train. Test: test.csv "
             "(3,080 rows), once per row. Model: the bundled all-MiniLM-L6-v2, `configs/limited_labels.yaml`. "
             "Pseudo-labels: `metric-ds pseudo-label` with its defaults (k-means, k = 2 x 77, min purity 0.8, "
             "min 2 labelled rows per cluster) on the frozen MiniLM. True precision uses the hidden gold labels, "
             "after the fact only.", "",
             f"Machine: {meta.get('machine')}, shared with other jobs (wall times vary with the load); "
             f"torch {meta.get('torch')}.", "",
             "| k | draw | row | configuration | test acc | test macro-F1 | k-NN acc (labelled bank) | pseudo rows "
             "(coverage) | est. precision | true precision | steps | train wall |",
             "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    keys = sorted({tuple(key.split("/")[:2]) for key in results if not key.startswith("_")})
    variants = sorted(key for key in results if "@" in key and "~" not in key and "#" not in key)
    shipped = shipped_recipe()
    for kk, dd in keys or [("k10", "draw0")]:
        for row, desc in ROWS.items():
            if row == "f":
                continue
            r = results.get(f"{kk}/{dd}/{row}")
            head = f"| {kk[1:]} | {dd[4:]} | {row} | {desc}{weight_note(r or {}, row, shipped)} |"
            if r is None:
                lines.append(head + " not run | | | | | | | |")
                continue
            p = r.get("pseudo", {})
            cover = f"{p['pseudo_labelled']} ({b77.pct(p['coverage'])}%)" if p else ""
            if r.get("label_free_rows"):
                cover += f" + {r['label_free_rows']} label-free"
            lines.append(f"{head} {b77.pct(r['test_accuracy'])} | {b77.pct(r['test_macro_f1'])} | {b77.pct(r.get('test_knn_acc'))} "
                         f"| {cover} | {b77.pct(r.get('estimated_precision'))} | {b77.pct(p.get('true_precision'))} "
                         f"| {r.get('steps', '')} | {r['train_wall_s'] / 60:.1f} min |")
    f = results.get("_oracle")
    lines.append("| 10 | (banking77 study) | f | " + ROWS["f"] + " | " +
                 (f"{b77.pct(f['test_accuracy'])} | {b77.pct(f['test_macro_f1'])} | | | | | {f['steps']} | "
                  f"{f['train_wall_s'] / 60:.1f} min |" if f else "not run | | | | | | | |"))
    if results.get("_pseudo"):
        lines += ["", "Pseudo-labels of each draw (`metric-ds pseudo-label` defaults; round 1 embeds with the frozen MiniLM, "
                  "round 2 with row c's model):", "",
                  "| draw | labelled rows | unlabelled rows | pseudo-labelled (coverage) | classes given pseudo rows "
                  "| est. precision (held-out rows assigned) | true precision |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, q in sorted(results["_pseudo"].items()):
            est = q["estimated_precision"]
            lines.append(f"| {name} | {q['labelled']} | {q['unlabelled']} | {q['pseudo_labelled']} "
                         f"({b77.pct(q['coverage'])}%) | {q['classes_with_pseudo']} of {len(q['per_class'])} "
                         f"| {b77.pct(est['precision'])} ({est['assigned']} of {est['held_out']}) "
                         f"| {b77.pct(q['true_precision'])} |")
    lines += ["", "Row f is an oracle upper bound (no user has those labels), with another recipe "
              f"({f['note'] if f else ''}); it is never compared with published results.", "",
              "Published few-shot results on the same test set (CPFT authors' table, test accuracy):", "",
              "| model | 5-shot | 10-shot |", "| --- | ---: | ---: |"]
    lines += [f"| {m} | {a:.2f} | {b:.2f} |" for m, a, b in ANCHORS]
    if variants:
        lines += ["", "## Variant: the checkpoint of least validation loss", "",
                  "`--checkpoint-by loss`: the same training, the checkpoint kept by validation loss instead of "
                  "accuracy (a smooth score on the same 77 rows). Tested once each, like every row.", "",
                  "| k | draw | row | by accuracy: step, test acc | by loss: step, test acc | loss - accuracy |",
                  "| ---: | ---: | --- | ---: | ---: | ---: |"]
        for key in variants:
            v, base = results[key], results.get(key.split("@")[0])
            kk, dd, row = key.split("@")[0].split("/")
            was = f"{base['best_step']}, {b77.pct(base['test_accuracy'])}" if base else "not run"
            diff = f"{100 * (v['test_accuracy'] - base['test_accuracy']):+.2f}" if base else ""
            lines.append(f"| {kk[1:]} | {dd[4:]} | {row} | {was} | {v['best_step']}, {b77.pct(v['test_accuracy'])} "
                         f"| {diff} |")
    lines += first_recipe_lines(results, shipped)
    searches = sorted(key for key in results if key.endswith("~search"))
    reused = {r["reused_from"]: key for key, r in results.items() if isinstance(r, dict) and r.get("reused_from")}
    if searches:
        lines += ["", "## Recipe search on validation", "",
                  "`--tune KEY=VALUE ...`: each candidate trained once more and judged on the validation table alone "
                  "(the kept checkpoint's accuracy; at equal accuracy, its CE where both runs recorded it); only the "
                  "chosen one is scored on test (a tie keeps the earlier: the row as it is, then the order given); "
                  "the row as it is has its test score from the study.",
                  "", "| k | draw | row | candidate | validation acc | validation CE | test acc |",
                  "| ---: | ---: | --- | --- | ---: | ---: | ---: |"]
        for skey in searches:
            search = results[skey]
            kk, dd, row = skey.split("~")[0].split("@")[0].split("/")
            for cand in search["candidates"]:
                r = results.get(cand, {})
                label = cand.split("~")[1] if "~" in cand else "as it is"
                mark = " (chosen)" if cand == search["chosen"] else ""
                # the row as it is was scored as part of the study; a candidate only when chosen
                test_acc = b77.pct(r.get("test_accuracy")) if cand == search["chosen"] or "~" not in cand else "not read"
                if cand in reused and cand != search["chosen"]:  # read later, as the study's row at that recipe
                    test_acc = f"{b77.pct(results[reused[cand]]['test_accuracy'])} (as row {row} re-run)"
                ce = f"{r['val_ce']:.3f}" if r.get("val_ce") is not None else "not recorded"
                lines.append(f"| {kk[1:]} | {dd[4:]} | {row} | {label}{mark} | {b77.pct(r.get('val_acc'))} | {ce} "
                             f"| {test_acc} |")
    lines += ["", "## Against the targets", ""]
    for kk, dd in keys:
        g = lambda row: (results.get(f"{kk}/{dd}/{row}") or {}).get("test_accuracy")  # noqa: E731
        a, b, c, d = g("a"), g("b"), g("c"), g("d")
        if kk == "k10" and a is not None and c is not None:
            gap = 100 * (c - a)
            lines.append(f"- {kk}, {dd}: (c) - (a) = {gap:+.2f} points (target +5: "
                         f"{'met' if gap >= 5 else f'missed by {5 - gap:.2f}'}).")
        if b is not None and c is not None:
            lines.append(f"- {kk}, {dd}: (c) {'>=' if c >= b else '<'} (b): {100 * c:.2f} vs {100 * b:.2f}.")
        best = max(v for v in (c, d, -1) if v is not None)
        if kk == "k10" and best >= 0:
            lines.append(f"- {kk}, {dd}: best of (c)/(d) {100 * best:.2f} vs CPFT 87.20 "
                         f"({100 * best - 87.20:+.2f}) and ICDA 89.79 ({100 * best - 89.79:+.2f}).")
        lines += label_free_and_peer_lines(results, kk, dd)
    lines += ["", "## Notes", ""] + [f"- {n}" for n in NOTES + results.get("_notes", [])]
    return "\n".join(lines) + "\n"


def first_recipe_lines(results: dict, shipped: dict) -> list[str]:
    """The rows re-run at the shipped recipe (``--rerun-stale``) beside their first run (``KEY#first``)."""
    firsts = sorted(key for key in results if key.endswith("#first"))
    if not firsts:
        return []
    w = shipped["metric_loss_weight"]
    lines = ["", "## The rows at the shipped recipe against their first run", "",
             f"`--rerun-stale`: the rows that train SupCon, run again with `configs/limited_labels.yaml` as it ships "
             f"(SupCon weight {w:g}, chosen on validation after the first rows ran; see the recipe search below). "
             "The table above holds the re-run rows; here each is beside its first run. A re-run row d pseudo-labels "
             "with the re-run row c's model. Where a search candidate had trained exactly the shipped recipe on the "
             "same draw and seed, it is the re-run (scored on test once, as the row).", "",
             "| k | draw | row | first run: SupCon weight | validation acc | test acc | shipped: validation acc "
             "| test acc | test: shipped - first |", "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key in firsts:
        old, new = results[key], results.get(key[:-len("#first")])
        kk, dd, row = key[:-len("#first")].split("@")[0].split("/")
        ow = row_recipe(old)["metric_loss_weight"]
        if row in ROUND2 and old.get("round1_recipe", FIRST_RECIPE) != row_recipe(old):
            ow_text = f"{ow:g} (round 1 at {old.get('round1_recipe', FIRST_RECIPE)['metric_loss_weight']:g})"
        else:
            ow_text = f"{ow:g}"
        head = (f"| {kk[1:]} | {dd[4:]} | {row} | {ow_text} | {b77.pct(old.get('val_acc'))} "
                f"| {b77.pct(old['test_accuracy'])} |")
        if new is None or stale(new, row, shipped):  # retired, its re-run not finished (or stopped)
            lines.append(head + " not re-run yet | | |")
            continue
        lines.append(f"{head} {b77.pct(new.get('val_acc'))} | {b77.pct(new['test_accuracy'])} "
                     f"| {100 * (new['test_accuracy'] - old['test_accuracy']):+.2f} |")
    return lines


def label_free_and_peer_lines(results: dict, kk: str, dd: str) -> list[str]:
    """The issue's targets for rows g and h: g against (a) + 2 and the published k-shot anchor, g against c (what
    the label-free rows add), and every product row against SetFit (h) in accuracy and training time."""
    row = lambda name: results.get(f"{kk}/{dd}/{name}")  # noqa: E731
    a, c, g, h = row("a"), row("c"), row("g"), row("h")
    cpft = {"k10": 87.20, "k5": 80.86}.get(kk)
    out = []
    if g is not None:
        acc = 100 * g["test_accuracy"]
        if a is not None:
            gap = acc - 100 * a["test_accuracy"]
            out.append(f"- {kk}, {dd}: (g) - (a) = {gap:+.2f} points (target +2: "
                       f"{'met' if gap >= 2 else f'missed by {2 - gap:.2f}'}).")
        if cpft is not None:
            out.append(f"- {kk}, {dd}: (g) {acc:.2f} vs CPFT {cpft:.2f} ({acc - cpft:+.2f}: "
                       f"{'met' if acc >= cpft else 'missed'}).")
        if c is not None:
            out.append(f"- {kk}, {dd}: what the label-free rows add, (g) - (c): {acc - 100 * c['test_accuracy']:+.2f}.")
    if h is not None:
        for name, first in (("a", None), ("c", None), ("d", "c"), ("g", None), ("g2", "g")):
            r, r1 = row(name), row(first) if first else None
            if r is None or (first and r1 is None):
                continue
            # the user's whole time: every round's pseudo-labelling (where measured) and training
            wall = sum(x["train_wall_s"] + (x.get("pseudo_label_wall_s") or 0) for x in (r, r1) if x)
            diff = 100 * (r["test_accuracy"] - h["test_accuracy"])
            both = diff > 0 and wall < h["train_wall_s"]
            verdict = "beats SetFit on both" if both else "does not beat SetFit on both"
            out.append(f"- {kk}, {dd}: ({name}) against SetFit (h): accuracy {100 * r['test_accuracy']:.2f} vs "
                       f"{100 * h['test_accuracy']:.2f} ({diff:+.2f}); time {wall / 60:.1f} vs "
                       f"{h['train_wall_s'] / 60:.1f} min ({verdict}).")
    return out


NOTES = [
    "Recipe (generic, `configs/limited_labels.yaml`): the BANKING77 settings (lr 1e-4, head lr 3e-3, batch 64, "
    "SupCon temperature 0.1, weight 0.25, chosen on validation; the study's first rows used 0.5, and those not "
    "re-run say so) on the pseudo-labelled table, whose labelled rows are repeated up to "
    "about half of it (`repeat_labelled`, as `pseudo-label --labelled-share 0.5` does; ~32 labelled rows in each "
    "batch of 64); rows on the labelled rows alone (a, e) train for 15 epochs. `--max-steps` caps every row at the "
    "same number of optimizer steps where the CPU allows no more (each row's steps are in the table).",
    "Checkpoint choice: accuracy on the validation table (one held-out labelled row per class, 77 rows, so "
    "+-5 points per run), evaluated at each epoch end; so each row trains on k - 1 labelled rows per class, "
    "one fewer than the published k-shot results use.",
    "k-NN accuracy searches a bank of the labelled training rows only (the verified rows).",
]


def save(result: dict | None, key: str | None, extra: dict | None = None) -> dict:
    """Merge ``result`` (and ``extra``'s keys) into the JSON as it is now on disk, so that several study processes
    (different rows or draws) can run at once; rewrite the Markdown."""
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    for k, v in (extra or {}).items():
        if k == "_pseudo":  # per draw and round: a summary on disk now updates, never drops, an earlier one
            results[k] = {**results.get(k, {}), **v}
        elif k.startswith("_"):
            results[k] = v
    if key is not None:
        results[key] = result
    RESULTS_JSON.write_text(json.dumps(results, indent=2))
    (b77.RESULTS / "limited_labels.md").write_text(render(results))
    return results


def tune(results: dict, key: str, row: str, k: int, seed: int, data_dir: Path, args: argparse.Namespace) -> dict:
    """The recipe search for one row of one draw: each ``args.tune`` override is trained and judged on
    validation only (``KEY~OVERRIDE``, no test score); the best validation accuracy among them and the row as it
    is wins (``banking77.beats``), and only a winning candidate is then scored on test, once. Records ``KEY~search``."""
    if key not in results:
        raise SystemExit(f"the search compares with {key} as it is: run that row first")
    for candidate in args.tune:
        cand_key = f"{key}~{candidate}"
        if cand_key not in results or args.force:
            results = save(run_row(row, k, seed, data_dir, args.max_steps, args.checkpoint_by, candidate), cand_key)
    base = results[key]
    if "val_ce" not in base and Path(base.get("run_dir", "")).joinpath("metrics.jsonl").exists():
        results = save(base | b77.validation_at_best(Path(base["run_dir"]), base["best_step"]), key)  # older rows
    by = "val_loss" if args.checkpoint_by == "loss" else "val_acc"
    chosen = key
    for candidate in args.tune:  # strictly better only: a tie keeps the row as it is
        if b77.beats(results[f"{key}~{candidate}"], results[chosen], by):
            chosen = f"{key}~{candidate}"
    if chosen != key and "test_accuracy" not in results[chosen]:
        r = results[chosen]
        paths = draw(data_dir, k, seed, WORK / f"k{k}_draw{seed}")
        _, test = b77.prepare(data_dir, "", [], 42)
        results = save(r | score_on_test(Path(r["run_dir"]), test, paths["labelled"]), chosen)
    criterion = by if by == "val_loss" else "val_acc, then val_ce"
    search = {"candidates": [key] + [f"{key}~{c}" for c in args.tune], "criterion": criterion, "chosen": chosen}
    return save(search, f"{key}~search")


def sibling(key: str, row: str, other: str) -> str:
    """The key of row ``other`` of the same draw and variant as ``key`` (row ``row``): k10/draw0/d@loss, c ->
    k10/draw0/c@loss."""
    head, last = key.rsplit("/", 1)
    return f"{head}/{other}{last[len(row):]}"


def round1_of(results: dict, key: str, row: str) -> dict | None:
    """The result of the round-1 row whose model pseudo-labels for round-2 row ``row`` (``key``); None otherwise."""
    return results.get(sibling(key, row, ROUND2[row])) if row in ROUND2 else None


def run_dir_of(r: dict | None) -> Path | None:
    return Path(r["run_dir"]) if r and r.get("run_dir") else None


def retire(r: dict, row: str, out: Path) -> dict:
    """Move a row that trained with an earlier recipe out of the way of its re-run: its run folder (and, for a
    round-2 row, its round-2 pseudo-label tables, which ``pseudo_label`` would otherwise reuse) take the suffix
    ``-metric_loss_weight-W``, as a search candidate's do; the result records where they went."""
    tag = f"-metric_loss_weight-{row_recipe(r)['metric_loss_weight']:g}"
    run_dir = Path(r.get("run_dir", ""))
    if r.get("run_dir") and run_dir.exists() and not run_dir.with_name(run_dir.name + tag).exists():
        r = r | {"run_dir": str(run_dir.rename(run_dir.with_name(run_dir.name + tag)))}
    if row in ROUND2:
        name = "pseudo_keep_round2" if row == "g2" else "pseudo_round2"
        for ext in (".parquet", ".summary.json", ".wall.json"):
            if (out / (name + ext)).exists():
                (out / (name + ext)).rename(out / (name + tag + ext))
    return r


def rerun_stale(results: dict, key: str, row: str, k: int, seed: int, data_dir: Path,
                args: argparse.Namespace) -> dict:
    """Re-run one row at the shipped recipe if it trained with another (``stale``), keeping the earlier result as
    ``KEY#first`` for the table that compares the two. A recipe-search candidate of this row that trained exactly
    the shipped recipe is that re-run already (same draw, seed and config): it becomes the row, scored on test
    once, instead of training it again."""
    shipped = shipped_recipe()
    old = results.get(key)
    if old is None or not stale(old, row, shipped):
        return results
    out = WORK / f"k{k}_draw{seed}"
    if f"{key}#first" not in results:  # else an interrupted re-run: the first run was moved aside already
        results = save(retire(old, row, out), f"{key}#first")
    same = [c for c, r in results.items() if c.startswith(f"{key}~") and not c.endswith("~search")
            and c.split("~", 1)[1].startswith("training.") and r.get("recipe") == shipped]
    if same and row not in ROUND2:
        r = results[same[0]] | {"reused_from": same[0]}
        if r.get("test_accuracy") is None:
            paths = draw(data_dir, k, seed, out)
            _, test = b77.prepare(data_dir, "", [], 42)
            r |= score_on_test(Path(r["run_dir"]), test, paths["labelled"])
        return save(r, key)
    first = round1_of(results, key, row)
    if first is not None and stale(first, ROUND2[row], shipped):
        raise SystemExit(f"{key} re-runs round 2 from its round-1 row, which trained another recipe: "
                         f"re-run row {ROUND2[row]} first (--rows {ROUND2[row]} {row})")
    result = run_row(row, k, seed, data_dir, args.max_steps, args.checkpoint_by, round1=run_dir_of(first))
    return save(result, key, {"_pseudo": pseudo_summaries()} if row != "e" else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[10, 5])
    p.add_argument("--draws", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rows", nargs="+", choices=[r for r in ROWS if r != "f"], default=["a", "c", "e", "b", "d"])
    p.add_argument("--force", action="store_true", help="re-run rows already in the results")
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap every row at this many optimizer steps (an equal compute budget; recorded in each row)")
    p.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the JSON")
    p.add_argument("--checkpoint-by", choices=["acc", "loss"], default="acc",
                   help="acc: the recipe (best validation accuracy); loss: the variant keyed ROW@loss, "
                        "checkpoint of least validation loss")
    p.add_argument("--tune", nargs="+", metavar="KEY=VALUE", default=None,
                   help="the recipe search: train ROWS once more with each config override, judge every candidate "
                        "and the row as it is on validation alone (accuracy of the kept checkpoint, then its CE), "
                        "and score only the chosen one on test (a tie keeps the earlier: the row as it is, then the "
                        "order given)")
    p.add_argument("--rerun-stale", action="store_true",
                   help="re-run the rows (c, d, e, g, g2) that trained with another SupCon recipe than "
                        "configs/limited_labels.yaml ships now; the earlier result is kept as KEY#first and compared "
                        "in its own table")
    args = p.parse_args()
    data_dir = b77.DATA
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    import platform

    import torch

    results["_meta"] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
                        "torch": torch.__version__}
    results["_oracle"] = oracle_row()
    results["_pseudo"] = {**results.get("_pseudo", {}), **pseudo_summaries()}
    results = save(None, None, results)
    for key, r in list(results.items()):  # rows recorded before each row kept its recipe
        if isinstance(r, dict) and "recipe" not in r and Path(r.get("run_dir", "")).joinpath("config.yaml").exists():
            results = save(r | {"recipe": recipe_of(Path(r["run_dir"]) / "config.yaml")}, key)
    for k in [] if args.render_only else args.k:
        for seed in args.draws:
            for row in args.rows:
                key = f"k{k}/draw{seed}/{row}" + ("" if args.checkpoint_by == "acc" else f"@{args.checkpoint_by}")
                if args.tune:
                    results = tune(results, key, row, k, seed, data_dir, args)
                    continue
                if args.rerun_stale:
                    results = rerun_stale(results, key, row, k, seed, data_dir, args)
                    continue
                if key in results and not args.force:
                    continue
                # rows b, c, d, g and g2 (re)write pseudo-label tables; a, e and h leave the summary as it was
                extra = {"_pseudo": pseudo_summaries()} if row in ("b", "c", "d", "g", "g2") else None
                round1 = run_dir_of(round1_of(results, key, row))
                results = save(run_row(row, k, seed, data_dir, args.max_steps, args.checkpoint_by, round1=round1),
                               key, extra)
    results = save(None, None, results)
    print((b77.RESULTS / "limited_labels.md").read_text())


if __name__ == "__main__":
    main()
