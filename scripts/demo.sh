#!/usr/bin/env bash
# The main job on BANKING77: prepare -> train -> evaluate on test.csv -> report -> a short table.
#   bash scripts/demo.sh full|quick        (make demo / make demo-quick)
# Reads the data from $BANKING77_DIR (default data/banking77, shipped in the repository); writes under demo_runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-full}
data_dir=${BANKING77_DIR:-data/banking77}
py=.venv/bin/python
out=demo_runs
config=configs/banking77.yaml
run_name=banking77
if [ "$mode" = quick ]; then config=configs/banking77_quick.yaml; run_name=banking77_quick; fi
for f in train.csv test.csv; do
  [ -f "$data_dir/$f" ] || { echo "error: $data_dir/$f not found: set BANKING77_DIR to the BANKING77 folder" >&2; exit 1; }
done
mkdir -p "$out/data"
start=$(date +%s)
$py -m metric_ds prepare --input "$data_dir/train.csv" --output "$out/data/banking77_train.parquet" \
    --text-column text --label-column category
$py -m metric_ds prepare --input "$data_dir/test.csv" --output "$out/data/banking77_test.parquet" \
    --text-column text --label-column category
$py -m metric_ds train --overwrite --config "$config" --set run_name=$run_name --set checkpointing.checkpoints_dir=$out \
    --set data.train_path=$out/data/banking77_train.parquet
$py -m metric_ds evaluate --model "$out/$run_name/best" --data "$out/data/banking77_test.parquet" \
    --output "$out/$run_name/eval/test.json"
$py -m metric_ds report "$out/$run_name"
$py - "$out/$run_name" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1]); wall = int(sys.argv[2])
summary = json.loads((run / "summary.json").read_text())
ev = json.loads((run / "eval" / "test.json").read_text())
rows = [
    ("test accuracy", f"{100 * ev['accuracy']:.2f}%"),
    ("test macro-F1", f"{100 * ev['macro_f1']:.2f}"),
    *[(f"test {k}", f"{100 * v:.2f}") for k, v in ev.get("retrieval", {}).items()],
    ("best " + summary["best_metric"], f"{summary['best_value']:.4f} (step {summary['best_step']})"),
    ("train throughput", f"{summary['train_samples_per_s']:.1f} samples/s"),
    ("wall time (all steps)", f"{wall // 60} min {wall % 60} s"),
    ("best model", summary["best_dir"]),
    ("report", str(run / "report" / "report.html")),
]
width = max(len(k) for k, _ in rows)
print("\nBANKING77 (PolyAI, CC BY 4.0): bundled all-MiniLM-L6-v2, CE + SupCon")
print("-" * (width + 30))
for k, v in rows:
    print(f"{k:<{width}}  {v}")
PY
