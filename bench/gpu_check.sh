#!/usr/bin/env bash
# GPU check and benchmark report: one script for a CUDA machine; installs nothing from the network.
#
#   bash bench/gpu_check.sh [REPORT_DIR]          # default REPORT_DIR: ${OUT:-bench/gpu_report}
#
# Needs a Python with torch (CUDA) and this repo's dependencies; spconv may come as local wheels, installed
# beforehand with `pip install --no-index .whl/*.whl` (see /work/.library/device/README.md for this workplace).
# It runs the CUDA-only tests (pytest -m gpu) and the benchmarks at real scale, and writes REPORT_DIR/gpu_report.md
# with every command's output. Budget: under 8 minutes on one H100.
# GPU_CHECK_SMOKE=1 runs the same steps at CPU scale, to test the script itself without a GPU.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPORT_DIR=${1:-${OUT:-bench/gpu_report}}
mkdir -p "$REPORT_DIR"
REPORT="$REPORT_DIR/gpu_report.md"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SMOKE=${GPU_CHECK_SMOKE:-0}
status=0

if [ "$SMOKE" = 1 ]; then
  DEV=cpu; B=tiny; PATCH="64 64 64"; PATCH_C=64; BIG=""; STEPS=2
else
  DEV=cuda; B=B; PATCH="112 112 128"; PATCH_C=112,112,128; BIG="L H"; STEPS=6
fi

section() {  # section TITLE TIMEOUT CMD...: run a command, record its output and status in the report
  local title=$1 limit=$2; shift 2
  echo "== $title" >&2
  local t0=$SECONDS out rc
  out=$(timeout "$limit" "$@" 2>&1); rc=$?
  [ $rc -ne 0 ] && status=1
  { echo; echo "## $title"; echo; echo "\`$*\` (exit $rc, $((SECONDS - t0)) s)"; echo; echo '```'; echo "$out" | tail -n 60
    echo '```'; } >> "$REPORT"
  echo "$out" | tail -n 5 >&2
}

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  $PY -c "import spconv; print('spconv', spconv.__version__)" 2>&1 | tail -n 1
  echo '```'
} > "$REPORT"

if [ "$SMOKE" = 1 ]; then
  section "CUDA tests (smoke: collected only)" 120 $PY -m pytest -m gpu -q --co tests
else
  section "CUDA tests (pytest -m gpu)" 240 $PY -m pytest -m gpu -q -x tests
fi
for amp in bf16 fp32; do
  section "pretraining step, STU-Net-$B, $PATCH, batch 2, $amp: AnatoMask vs SparK" 150 \
    $PY bench/bench_pretrain.py --size $B --patch $PATCH --batch 2 --amp $amp --steps $STEPS --device $DEV
done
section "network: backends masked vs spconv vs dense, STU-Net-$B" 150 \
  $PY bench/bench_network.py --size $B --batch 2 --patch $PATCH_C --device $DEV --repeats 3
for size in $BIG; do
  section "pretraining step, STU-Net-$size with gradient checkpointing, bf16 (fits in 80 GB?)" 150 \
    $PY bench/bench_pretrain.py --size $size --patch $PATCH --batch 2 --amp bf16 --steps 2 --warmup 1 --device $DEV \
    --methods anatomask
done
section "mask generation (vectorised vs per-sample loop)" 60 $PY bench/bench_masking.py --device $DEV --repeats 50
section "data loader throughput" 120 $PY bench/bench_data.py --batches 10

echo "report: $REPORT (status $status)" >&2
exit $status
