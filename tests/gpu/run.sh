#!/usr/bin/env bash
# `make test-gpu`: the GPU smoke suite (tests/gpu), in the venv or, on a lent GPU machine, with python3 and
# the carried wheels (benchmarks/gpu_env.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu_env.sh
$PY -c "import torch; print('torch', torch.__version__, '| CUDA device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (CUDA tests skip)')"
exec $PY -m pytest -p no:cacheprovider -q -rs tests/gpu "$@"
