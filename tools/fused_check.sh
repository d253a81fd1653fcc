#!/usr/bin/env bash
# On a GPU machine, from the repository root: the fused kernels' GPU tests, then their benchmarks
# (tools/bench_gemv.py --chain --fused --variants). Full logs under $OUT (default ./out); a short summary last.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
    > "$OUT/smi.txt" 2>&1
timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_llama_fused.py \
    > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest.log"
timeout "${BENCH_TIMEOUT:-200}" python3 tools/bench_gemv.py --chain --fused --variants ${BENCH_ARGS:-} \
    --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"
cat "$OUT/smi.txt"
grep -E "^(FAILED|ERROR)|passed|failed|rc=" "$OUT/pytest.log" | cut -c1-300 | head -40
cat "$OUT/bench.log"
