#!/usr/bin/env bash
# The GPU check: everything the CUDA path needs verified, in one prepared run of at most 6 minutes on a lent GPU
# (machine start excluded), so that it can be run, fixed and run again within a 15-minute lease.
#
#   make gpu-wheels                          # here, once: .whl/ with DeepSpeed, pydantic and their missing deps
#   bash scripts/gpu_check.sh                # there, with .whl carried (no network needed)
#   bash scripts/gpu_check.sh --cpu-dry-run  # here: the same steps at tiny sizes on CPU (no sanitizer, no fp16)
#   bash scripts/gpu_check.sh --budgets      # each step's time budget and their sum, nothing run
#
# Steps, in order, each with a time budget (the sum is at most BUDGET, 360 s), each printing one line
# "N name: PASS|FAIL|SKIP (S s)" and writing its result files as soon as it ends (a lease that runs out still
# returns what ran). SKIP is for what the machine lacks, never for a failure.
#   1 env       install .whl/ (pip --no-index --find-links .whl), report GPU, driver, torch, CUDA, versions
#   2 build     build the op in place for the visible GPU only (TORCH_CUDA_ARCH_LIST = its capability, unless set)
#   3 tests     tests/test_supcon_device.py (fused vs reference in fp32/bf16/fp16, anchor slices, B up to 65,536,
#               METRIC_DS_SUPCON_TILE=64; FAIL if it was skipped as a whole), and the device-parametrised
#               op/bank/metrics tests
#   4 nosync    a few training steps under torch.cuda.set_sync_debug_mode("error"): the tests of
#               tests/test_host_syncs.py selected by -k sync_debug (SKIP on CPU, where they skip)
#   5 runs      scripts/gpu_check_runs.py: bf16 contrastive_batch: accumulated with dropout, a checkpoint saved
#               and resumed (the same loss as a straight run), one fp16 run
#   6 bench     op timings: fused, reference, gemm_bound; B 256..65536 (the crossover for auto), d 384/768,
#               fp32 and bf16
#   7 overhead  `metric-ds train` (BERT-base-sized, bf16, ZeRO 0 and 2, the fused op, batch 128, length 64)
#               beside a bare PyTorch loop with the same bf16 weights and pinned loader
#   8 memcheck  compute-sanitizer memcheck on one small forward + backward, when its whole budget is left;
#               SKIP when compute-sanitizer is missing or refuses the device
# Everything goes to $OUT (the device tool's folder), else ./gpu_check_out: summary.md (the step lines),
# log.txt (every command's output), env.txt, supcon.csv/.md, overhead.json/.md. The exit status is 1 if a step
# failed. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# NUM NAME BUDGET FUNCTION [optional]: an optional step runs only when its whole budget is left, else SKIP.
BUDGET=360  # seconds for the whole script on the GPU, machine start excluded
STEPS=(
  "1 env 20 env_step"
  "2 build 70 build_step"
  "3 tests 40 tests_step"
  "4 nosync 20 nosync_step"
  "5 runs 55 runs_step"
  "6 bench 50 bench_step"
  "7 overhead 70 overhead_step"
  "8 memcheck 35 memcheck_step optional"
)
print_budgets() {
  local spec num name limit rest sum=0 text=""
  for spec in "${STEPS[@]}"; do
    read -r num name limit rest <<< "$spec"
    text+="${text:+, }$num $name ${limit}s"; sum=$((sum + limit))
  done
  echo "budgets: $text; sum ${sum}s of ${BUDGET}s"
}

DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  --budgets) print_budgets; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--cpu-dry-run | --budgets]"; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/log.txt
SUMMARY=$OUTDIR/summary.md
WORK=$(mktemp -d)  # model, tables and runs: large, never under $OUT
trap 'rm -rf "$WORK"' EXIT
: > "$LOG"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
if [ $DRY = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" METRIC_DS_CHECK_DEVICE=cpu METRIC_DS_CHECK_MAX_B=300
  DEVICE=cpu
else
  export DS_ACCELERATOR=cuda MAX_JOBS=${MAX_JOBS:-16} NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} --threads 4"
  DEVICE=cuda
fi
T0=$(date +%s)
FAILED=0
echo "# GPU check $(date -u +%FT%TZ), $([ $DRY = 1 ] && echo 'CPU dry run' || echo 'GPU')" | tee "$SUMMARY"
print_budgets | tee -a "$SUMMARY"

# step NUM NAME LIMIT FUNCTION [optional]: run FUNCTION with at most LIMIT seconds (less if the budget is nearly
# spent; an optional step is skipped instead). Exit 77 from FUNCTION means SKIP.
step() {
  local num=$1 name=$2 limit=$3 fn=$4 optional=${5:-} left start rc secs status note=""
  left=$((BUDGET - ($(date +%s) - T0)))
  if [ $DRY = 1 ]; then
    limit=$((limit * 4))  # a shared CPU, not a timed lease: be lenient (a load average of 27 was seen)
    note=", ${limit}s in the dry run"
  elif [ -n "$optional" ] && [ "$left" -lt "$limit" ]; then
    echo "===== step $num $name: ${left}s left, it needs ${limit}s" >> "$LOG"
    printf -- "- %s %s: SKIP (%d s left of its %d s budget)\n" "$num" "$name" "$left" "$limit" | tee -a "$SUMMARY"
    return
  elif [ "$left" -lt "$limit" ]; then
    limit=$((left > 10 ? left : 10))
  fi
  echo "===== step $num $name (budget ${3}s$note)" | tee -a "$LOG"
  start=$(date +%s%N)
  timeout --kill-after=10 "$limit" bash -c "$(declare -f "$fn"); $(declare -p DRY PY OUTDIR WORK DEVICE ROOT); $fn" \
    >> "$LOG" 2>&1
  rc=$?
  secs=$(( ($(date +%s%N) - start) / 1000000000 ))
  case $rc in
    0) status=PASS ;;
    77) status=SKIP ;;
    124|137) status="FAIL (timed out after ${limit}s)"; FAILED=1 ;;
    *) status="FAIL (exit $rc)"; FAILED=1 ;;
  esac
  printf -- "- %s %s: %s (%d s)\n" "$num" "$name" "$status" "$secs" | tee -a "$SUMMARY"
}

env_step() {
  set -e
  if [ $DRY = 0 ]; then
    ls .whl/*.whl > /dev/null || { echo "no .whl/: run 'make gpu-wheels' here and carry .whl"; exit 1; }
    $PY -m pip install -q --no-index --find-links .whl --no-compile deepspeed pydantic
  fi
  {
    echo "date: $(date -u +%FT%TZ)"; uname -a; echo "python: $($PY -V 2>&1)"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
    command -v nvcc > /dev/null && nvcc --version | tail -2
    $PY - <<'EOF'
import importlib.metadata as md
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
for name in ("transformers", "deepspeed", "pydantic", "pydantic-core", "numpy", "pandas", "pyarrow", "safetensors",
             "tokenizers", "ninja", "pytest"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
from metric_ds.ops import build
print("default TORCH_CUDA_ARCH_LIST:", build.default_arch_list())
EOF
  } | tee "$OUTDIR/env.txt"
  $PY -c "import deepspeed, pydantic, transformers, metric_ds.config"
}

build_step() {
  set -e
  if [ $DRY = 1 ]; then
    export METRIC_DS_SKIP_CUDA=1
  elif [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    # the visible GPU only: one architecture compiles in a fraction of the default list's time
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
    export TORCH_CUDA_ARCH_LIST
  fi
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
  $PY setup.py -q build_ext --inplace
  $PY - <<EOF
from metric_ds.ops import op_status
s = op_status()
print(s)
assert s["${DEVICE}_available"], s
EOF
}

tests_step() {
  set -e
  local sel="$DEVICE" out
  [ $DRY = 1 ] && sel="cpu and not 1025 and not 4099 and not 2500"  # the small CPU cases: the dry run's budget
  out=$($PY -m pytest -q -x -p no:cacheprovider -o addopts="" -rs tests/test_supcon_device.py 2>&1) || {
    echo "$out"; exit 1; }
  echo "$out"
  # skipped as a whole (op not built for the device, no GPU seen), pytest still exits 0: that is a failure here
  grep -Eq "[0-9]+ passed" <<< "$out" || { echo "tests/test_supcon_device.py ran nothing on $DEVICE"; exit 1; }
  $PY -m pytest -q -x -p no:cacheprovider -o addopts="" -m "not slow" -k "$sel" \
    tests/test_supcon_op.py tests/test_bank.py tests/test_metrics.py tests/test_encode.py
}

nosync_step() {
  # GPU-only tests (skipped without CUDA): a few training steps under set_sync_debug_mode("error")
  local out rc
  out=$($PY -m pytest -q -p no:cacheprovider -o addopts="" -rs -k sync_debug tests/test_host_syncs.py 2>&1)
  rc=$?
  echo "$out"
  [ $rc = 0 ] || [ $rc = 5 ] || exit 1  # 5: nothing selected
  if grep -Eq "[0-9]+ passed" <<< "$out" && ! grep -Eq "[0-9]+ skipped" <<< "$out"; then exit 0; fi
  if [ $DRY = 1 ]; then echo "the sync_debug tests need CUDA"; exit 77; fi
  echo "the sync_debug tests of tests/test_host_syncs.py did not all run on the GPU"; exit 1
}

runs_step() {
  set -e
  $PY scripts/gpu_check_runs.py --device "$DEVICE" --workdir "$WORK/runs"
}

memcheck_step() {
  if [ $DRY = 1 ]; then echo "skipped in the CPU dry run"; exit 77; fi
  local sanitizer out rc only_ours=()
  sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2> /dev/null) \
    || { echo "compute-sanitizer not found"; exit 77; }
  cat > "$WORK/sanitize_case.py" <<'CASE'
import torch
import torch.nn.functional as F
from metric_ds.ops import supcon_loss
g = torch.Generator().manual_seed(0)
z0 = F.normalize(torch.randn(300, 64, generator=g), dim=1).cuda()
y = torch.randint(0, 7, (300,), generator=g).cuda()
for dtype in (torch.float32, torch.bfloat16):
    for start, count in ((0, None), (50, 100)):  # the symmetric path and an anchor slice
        z = z0.to(dtype).requires_grad_()
        loss, _ = supcon_loss(z, y, 0.1, start, count, impl="fused", num_classes=7)
        loss.backward()
torch.cuda.synchronize()
print("sanitizer case ok:", float(loss))
CASE
  # No caching allocator: each tensor is its own allocation, so memcheck sees an overrun past its end.
  # A 128-wide tile: 300 rows cross three tiles, the last one partial. Our kernels only, where this version can
  # filter by name (cuBLAS's would take minutes).
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1 METRIC_DS_SUPCON_TILE=128
  "$sanitizer" --help 2>&1 | grep -q -- "--kernel-name" && only_ours=(--kernel-name kns=metric_ds)
  out=$("$sanitizer" --tool memcheck --error-exitcode 1 --print-limit 20 --report-api-errors no "${only_ours[@]}" \
    $PY "$WORK/sanitize_case.py" 2>&1)
  rc=$?
  echo "$out"
  [ $rc = 0 ] && grep -q "sanitizer case ok" <<< "$out" && exit 0
  # a finding is a failure; a tool that cannot attach to this device or driver is something the machine lacks
  grep -Eq "ERROR SUMMARY: [1-9]" <<< "$out" && exit 1
  if grep -Eiq "not supported|unsupported|incompatible|permission|not permitted|failed to (initialize|attach)|before first instrumented" <<< "$out"; then
    echo "compute-sanitizer refused this device: SKIP"; exit 77
  fi
  exit 1
}

bench_step() {
  set -e
  local args
  if [ $DRY = 1 ]; then
    args="--device cpu --in-process --B 64 128 --d 16 --reps 1"
  else
    args="--device cuda --in-process --B 256 512 1024 2048 4096 16384 65536 --d 384 768 --reps 3
      --reference-max-B 16384"
  fi
  for dtype in fp32 bf16; do
    $PY benchmarks/bench_supcon.py $args --dtype $dtype --providers fused reference gemm_bound --modes full \
      --out "$OUTDIR/supcon-$dtype.csv" --markdown "$OUTDIR/supcon.md"
  done
  # one CSV: the second run kept the first's rows only for other devices, so join the two
  { cat "$OUTDIR/supcon-fp32.csv"; tail -n +2 "$OUTDIR/supcon-bf16.csv"; } > "$OUTDIR/supcon.csv"
  rm -f "$OUTDIR/supcon-fp32.csv" "$OUTDIR/supcon-bf16.csv"
  $PY - "$OUTDIR/supcon.csv" "$OUTDIR/supcon.md" <<'EOF'
import csv, sys
sys.path.insert(0, "benchmarks")
import harness
rows = list(csv.DictReader(open(sys.argv[1])))
bad = [r for r in rows if r["provider"] == "fused" and r["status"] != "ok"]
text = "\n\n".join([harness.markdown_table(rows, "time", "s"), harness.markdown_table(rows, "peak_mem_growth", "MiB")])
harness.replace_between_markers(__import__("pathlib").Path(sys.argv[2]), "supcon", text)
print(text)
assert not bad, f"fused cases failed: {bad}"
EOF
}

overhead_step() {
  set -e
  if [ $DRY = 1 ]; then
    # ZeRO 0 and 2 with the fused op: three processes, to keep the dry run within about three minutes
    $PY benchmarks/bench_overhead.py --device cpu --size tiny --batch 8 --seq 16 --steps 4 --log-every 2 \
      --precision bf16 --zero 0 2 --impl fused --out "$OUTDIR" --workdir "$WORK/overhead"
  else
    # the fused op only (the reference differs inside the loss, which step bench times): three processes
    $PY benchmarks/bench_overhead.py --device cuda --size bert-base --batch 128 --seq 64 --steps 30 \
      --log-every 10 --precision bf16 --zero 0 2 --impl fused --out "$OUTDIR" --workdir "$WORK/overhead"
  fi
  cat "$OUTDIR/overhead.md" >> "$OUTDIR/summary.md"  # in the summary at once, whatever comes after
}

for spec in "${STEPS[@]}"; do
  # shellcheck disable=SC2086 - the spec's words are step's arguments
  step $spec
done
total=$(( $(date +%s) - T0 ))
echo "total: ${total} s of ${BUDGET} s; results in $OUTDIR" | tee -a "$SUMMARY"
exit $FAILED
