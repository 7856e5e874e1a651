#!/usr/bin/env bash
# The GPU check: everything the CUDA path needs verified, in one prepared run of at most 8 minutes on a lent GPU.
#
#   make gpu-wheels                       # here, once: .whl/ with DeepSpeed, pydantic and their missing deps
#   bash scripts/gpu_check.sh          # there, with .whl carried (no network needed)
#   bash scripts/gpu_check.sh --cpu-dry-run   # here: the same steps at tiny sizes on CPU (no sanitizer)
#
# Steps, in order, each with a time limit, each printing one line "N name: PASS|FAIL|SKIP (S s)":
#   1 env        install .whl/ (pip --no-index --find-links .whl), report GPU, driver, torch, CUDA, versions
#   2 build      build the op in place against the installed torch (setup.py build_ext --inplace)
#   3 tests      the device-parametrised op/bank/metrics tests on the device, and tests/test_supcon_device.py:
#                fused vs reference in fp32/bf16/fp16, anchor slices, B up to 65,536, METRIC_DS_SUPCON_TILE=64
#   4 sanitizer  compute-sanitizer memcheck and racecheck on one small forward + backward
#   5 bench      op benchmark: fused, reference, gemm_bound; B 4096/16384/65536, d 384/768, fp32 and bf16
#   6 train      60 steps of `metric-ds train` (BERT-base-sized, bf16, ZeRO 0 and 2, fused and reference,
#                batch 128, length 64) beside a bare PyTorch loop: samples/s, peak memory, overhead ratio
# Everything goes to $OUT (the device tool's folder), else ./gpu_check_out: summary.md (the step lines),
# log.txt (every command's output), env.txt, supcon.csv/.md, overhead.json/.md. The exit status is 1 if a step
# failed. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then DRY=1; elif [ -n "${1:-}" ]; then
  echo "usage: $0 [--cpu-dry-run]"; exit 2
fi
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
BUDGET=480  # seconds for the whole script on the GPU
T0=$(date +%s)
FAILED=0
echo "# GPU check $(date -u +%FT%TZ), $([ $DRY = 1 ] && echo 'CPU dry run' || echo 'GPU')" | tee "$SUMMARY"

# step NUM NAME LIMIT FUNCTION: run FUNCTION with at most LIMIT seconds (less if the budget is nearly spent).
step() {
  local num=$1 name=$2 limit=$3 fn=$4 left start rc secs status
  left=$((BUDGET - ($(date +%s) - T0)))
  if [ $DRY = 1 ]; then
    limit=$((limit * 4))  # a shared CPU, not a timed lease: be lenient (a load average of 27 was seen)
  elif [ "$left" -lt "$limit" ]; then
    limit=$((left > 10 ? left : 10))
  fi
  echo "===== step $num $name (limit ${limit}s)" >> "$LOG"
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
  if [ $DRY = 1 ]; then export METRIC_DS_SKIP_CUDA=1; fi
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
  local sel="$DEVICE"
  [ $DRY = 1 ] && sel="cpu and not 1025 and not 4099 and not 2500"  # the small CPU cases: the dry run's budget
  $PY -m pytest -q -x -p no:cacheprovider -o addopts="" tests/test_supcon_device.py
  $PY -m pytest -q -x -p no:cacheprovider -o addopts="" -m "not slow" -k "$sel" \
    tests/test_supcon_op.py tests/test_bank.py tests/test_metrics.py
}

sanitizer_step() {
  if [ $DRY = 1 ]; then echo "skipped in the CPU dry run"; exit 77; fi
  set -e
  cat > "$WORK/sanitize_case.py" <<'EOF'
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
EOF
  # No caching allocator: each tensor is its own allocation, so memcheck sees an overrun past its end.
  # A 128-wide tile: 300 rows cross three tiles, the last one partial.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1 METRIC_DS_SUPCON_TILE=128
  compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 $PY "$WORK/sanitize_case.py"
  # racecheck on our kernels only (cuBLAS's would take minutes), where this version can filter by name
  local only_ours=()
  compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name" && only_ours=(--kernel-name kns=metric_ds)
  compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 "${only_ours[@]}" \
    $PY "$WORK/sanitize_case.py"
}

bench_step() {
  set -e
  local args
  if [ $DRY = 1 ]; then
    args="--device cpu --in-process --B 64 128 --d 16 --reps 1"
  else
    args="--device cuda --in-process --B 4096 16384 65536 --d 384 768 --reps 5 --reference-max-B 16384"
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

train_step() {
  set -e
  if [ $DRY = 1 ]; then
    # ZeRO 0 and 2 with the fused op: three processes (the reference differs only inside the loss, which
    # step 3 tested), to keep the dry run within about three minutes
    $PY benchmarks/bench_overhead.py --device cpu --size tiny --batch 8 --seq 16 --steps 4 --log-every 2 \
      --precision bf16 --zero 0 2 --impl fused --out "$OUTDIR" --workdir "$WORK/overhead"
  else
    $PY benchmarks/bench_overhead.py --device cuda --size bert-base --batch 128 --seq 64 --steps 60 \
      --log-every 10 --precision bf16 --zero 0 2 --impl fused reference --out "$OUTDIR" --workdir "$WORK/overhead"
  fi
}

step 1 env 40 env_step
step 2 build 120 build_step
step 3 tests 75 tests_step
step 4 sanitizer 50 sanitizer_step
step 5 bench 75 bench_step
step 6 train 150 train_step
total=$(( $(date +%s) - T0 ))
echo "total: ${total} s; results in $OUTDIR" | tee -a "$SUMMARY"
[ -f "$OUTDIR/overhead.md" ] && cat "$OUTDIR/overhead.md" >> "$SUMMARY"
exit $FAILED
