"""benchmarks/studies/limited_labels.py: which rows a change of the shipped recipe makes stale, and how a re-run
keeps the first run's result and files out of its way (the study's bookkeeping, not its trainings)."""
from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "studies"))
import limited_labels as ll  # noqa: E402

SHIPPED = {"metric_loss_weight": 0.25, "supcon_temperature": 0.1, "label_free_weight": 1.0}
OLD = {**SHIPPED, "metric_loss_weight": 0.5}


def test_the_shipped_recipe_is_read_from_the_shipped_config():
    assert set(ll.shipped_recipe()) == set(ll.RECIPE_KEYS)


def test_a_supcon_row_of_another_recipe_is_stale_and_rows_without_supcon_never_are():
    assert ll.stale({"recipe": OLD}, "c", SHIPPED)
    assert not ll.stale({"recipe": SHIPPED}, "c", SHIPPED)
    assert ll.stale({}, "e", SHIPPED)  # rows from before rows recorded a recipe ran the first one
    assert not ll.stale({}, "a", SHIPPED) and not ll.stale({"recipe": OLD}, "b", SHIPPED)


def test_a_round_two_row_is_stale_when_its_round_one_model_was():
    assert ll.stale({"recipe": SHIPPED}, "g2", SHIPPED)  # no round1_recipe: pseudo-labelled by a first-recipe model
    assert ll.stale({"recipe": SHIPPED, "round1_recipe": OLD}, "d", SHIPPED)
    assert not ll.stale({"recipe": SHIPPED, "round1_recipe": SHIPPED}, "d", SHIPPED)


def test_the_table_names_the_recipe_of_a_row_not_at_the_shipped_one():
    assert ll.weight_note({"recipe": OLD}, "c", SHIPPED) == " (SupCon weight 0.5)"
    assert ll.weight_note({"recipe": SHIPPED}, "c", SHIPPED) == ""
    assert ll.weight_note({"recipe": SHIPPED}, "g2", SHIPPED) == " (round 1 at SupCon weight 0.5)"
    assert ll.weight_note({"recipe": {**OLD, "metric_loss_weight": 0.0}}, "a", SHIPPED) == ""


def test_sibling_keeps_the_draw_and_the_variant():
    assert ll.sibling("k10/draw0/d", "d", "c") == "k10/draw0/c"
    assert ll.sibling("k5/draw1/g2@loss", "g2", "g") == "k5/draw1/g@loss"


def test_retire_moves_the_run_folder_and_the_round_two_tables(tmp_path):
    run = tmp_path / "runs" / "d"
    run.mkdir(parents=True)
    for ext in (".parquet", ".summary.json", ".wall.json"):
        (tmp_path / f"pseudo_round2{ext}").write_text("x")
    moved = ll.retire({"recipe": OLD, "run_dir": str(run), "test_accuracy": 0.8}, "d", tmp_path)
    assert moved["run_dir"] == str(tmp_path / "runs" / "d-metric_loss_weight-0.5") and not run.exists()
    assert moved["test_accuracy"] == 0.8
    assert not (tmp_path / "pseudo_round2.parquet").exists()  # else pseudo_label would reuse the old round 2
    assert (tmp_path / "pseudo_round2-metric_loss_weight-0.5.summary.json").exists()
    # a row whose folder is gone (older sessions deleted them) is kept as it is
    assert ll.retire({"recipe": OLD, "run_dir": str(run)}, "c", tmp_path)["run_dir"] == str(run)


def test_the_first_recipe_table_pairs_each_first_run_with_its_re_run():
    first = {"recipe": OLD, "val_acc": 0.8, "test_accuracy": 0.85}
    results = {"k10/draw0/c#first": first, "k10/draw0/c": {"recipe": SHIPPED, "val_acc": 0.83, "test_accuracy": 0.86},
               "k5/draw1/d#first": first, "k5/draw1/d": first}  # retired, its re-run still training
    rows = [line for line in ll.first_recipe_lines(results, SHIPPED) if line.startswith("| 10") or
            line.startswith("| 5")]
    assert rows == ["| 10 | 0 | c | 0.5 | 80.00 | 85.00 | 83.00 | 86.00 | +1.00 |",
                    "| 5 | 1 | d | 0.5 | 80.00 | 85.00 | not re-run yet | | |"]
