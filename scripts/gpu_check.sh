#!/usr/bin/env bash
# The prepared GPU run (issue 10): CUDA tests, then the GPU benchmark, on a machine with one GPU.
#   bash scripts/gpu_check.sh OUT_DIR [TEST_TIMEOUT_S] [BENCH_TIMEOUT_S] [benchmark args...]
# Wheels in .whl/ (zstandard, pytest-asyncio, ... for that machine's Python) are installed into /tmp/site first;
# the project itself is installed there too (no dependencies, no build isolation), as a user would.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR [TEST_TIMEOUT_S] [BENCH_TIMEOUT_S] [bench args]}
TEST_S=${2:-150}
BENCH_S=${3:-420}
shift $(( $# < 3 ? $# : 3 ))
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site-ckpt . >"$OUT/install.log" 2>&1 \
  && echo "pip install of the project: ok" || { echo "pip install of the project FAILED"; tail -5 "$OUT/install.log"; }
{ nvidia-smi -L; $PY -V; $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
  nproc; free -g | head -2; df -h /tmp | tail -1; } 2>&1 | tee "$OUT/env.txt"
# TESTS (space-separated pytest targets) narrows the test run to what a short lease allows
read -r -a tests <<< "${TESTS:-tests/test_cuda.py tests/test_device_snapshot.py tests/test_ring.py tests/test_registered_pieces.py tests/test_service.py tests/test_bench_gpu_smoke.py}"
echo "== CUDA tests: ${tests[*]}"
timeout "$TEST_S" $PY -m pytest -q -p no:cacheprovider -x -rs "${tests[@]}" 2>&1 | tee "$OUT/tests.log" | tail -25
echo "== GPU benchmark"
rm -rf /tmp/gpubench
timeout "$BENCH_S" $PY -m benchmarks.gpu --config "${CONFIG:-benchmarks/configs/gpu_10gb.yaml}" --out /tmp/gpubench "$@" 2>&1 \
  | tee "$OUT/bench.log" | tail -40
for d in /tmp/gpubench/*/; do cp "$d"results* "$OUT/" 2>/dev/null; done
ls -la "$OUT"
