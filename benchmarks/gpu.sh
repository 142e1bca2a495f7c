#!/usr/bin/env bash
# The GPU kernel suite in one go, for a lent H100/H200: the device's own ceilings (dense bf16 matmul TFLOP/s,
# copy GB/s) first and again last, then log-prob, grouped GEMM and router, every row as a ratio to the torch
# reference measured in the same run and to the measured ceiling. Usage (from anywhere):
#     benchmarks/gpu.sh [OUT_DIR]          # default benchmarks/results/gpu-<date>
# On a lent GPU machine carry .whl (`make gpu-wheels`): gpu_env.sh builds the CUDA extension in place for the
# `cuda` log-prob backend; without it the log-prob rows run naive + triton only. Results: OUT_DIR/*.json,
# OUT_DIR/all.json (every row), OUT_DIR/targets.txt (the issue's targets as PASS/MISS), OUT_DIR/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh  # PY: the venv's python, or python3 + carried wheels on a lent GPU machine
OUT=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv \
    > "$OUT/device.csv" 2>&1 || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    | tee "$OUT/versions.txt"

LOGPROB_IMPLS=naive,triton
if "$PY" -c "from prism_mcore import _C; raise SystemExit(0 if _C.built_with_cuda() else 1)" 2>/dev/null; then
    LOGPROB_IMPLS=naive,cuda,triton
else
    echo "prism_mcore._C has no CUDA kernels: log-prob runs naive,triton only" | tee -a "$OUT/versions.txt"
fi

bench() {  # bench NAME ARGS... -> OUT/NAME.json and OUT/NAME.log
    local name=$1; shift
    echo "== prism bench $* ==" >&2
    "$PY" -m prism_mcore.bench "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
}

bench ceiling ceiling
bench logprob logprob --impls "$LOGPROB_IMPLS" --ceiling "$OUT/ceiling.json"
bench grouped_gemm grouped-gemm --ceiling "$OUT/ceiling.json"
bench router router --ceiling "$OUT/ceiling.json"
bench ceiling_after ceiling   # a drift between the two ceilings (clocks, thermals) qualifies every ratio

"$PY" -m prism_mcore.bench.targets "$OUT"
echo "results in $OUT"
