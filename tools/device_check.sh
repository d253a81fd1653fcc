#!/usr/bin/env bash
# One device call: GPU tests, then the benchmarks, logs under $OUT. Usage on the lent GPU:
#   bash tools/device_check.sh [pytest args...]
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# compiled kernels made here by tools/prebuild.py (carry .kcache): a fresh machine then compiles nothing
if [ -d .kcache ] && [ -z "${DAGBUILD_CACHE_DIR+x}" ]; then export DAGBUILD_CACHE_DIR=$PWD/.kcache; fi
echo "kernel cache: ${DAGBUILD_CACHE_DIR:-~/.cache/dagbuild} ($(ls "${DAGBUILD_CACHE_DIR:-$HOME/.cache/dagbuild}" 2>/dev/null | grep -c cubin) cubins)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
STAGES=${STAGES:-"tests bench pool"}
# the fused spec's fresh pool build, timed (args: a label, then tools/bench_pool.py's options)
fresh_build() {
  local label=$1; shift
  timeout 300 python3 tools/bench_pool.py --only fresh --spec specs/llama_decode_fused.yaml "$@" 2>&1 | tail -1 \
    | python3 -c "import json, sys; d = json.loads(sys.stdin.read()); print('$label: build', round(d['build_s'], 3), 's; host s by phase', d['phases_s'], ';', d['per_bucket_ms'])"
}
# the md5 of a spec's 300 greedy tokens at max_seq 2048 (args: the spec and its --set options): variants that
# change only how a step runs must print the shipped spec's
tokens_md5() {
  echo "$(timeout 90 python3 -m dagbuild.cli run "$@" --set max_seq=2048 --tokens 300 --prefill positions --no-progress \
    2>&1 | grep "^row 0" | md5sum) $*"
}
for stage in $STAGES; do
  case $stage in
    tests)  # with pytest-xdist carried (../shared/device/wheels.sh pytest-xdist): TESTS_WORKERS processes share the
      # GPU, a test file a worker (its module fixtures built once); every memory check in tests/gpu is per process
      xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TESTS_WORKERS:-4} --dist loadfile")
      timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -m gpu -q -p no:cacheprovider -rf --durations=25 $xdist "$@" tests/gpu > "$OUT/pytest.log" 2>&1
      grep -E "^(FAILED|ERROR)|passed|failed|^[0-9.]+s (call|setup)" "$OUT/pytest.log" | tail -60 ;;
    hfnote)
      timeout 200 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/gpu/test_llama_hf.py -k "fp16 or fp32" 2>&1 \
        | grep -i "fp16\|fp32\|passed\|failed" | tail -15 ;;
    bench)
      timeout 120 python3 -m dagbuild.cli bench specs/fanout4.yaml --json > "$OUT/bench_fanout4.json"
      timeout 120 python3 -m dagbuild.cli bench specs/chain.yaml --set steps=128 --json > "$OUT/bench_chain128.json"
      python3 - "$OUT" <<'PY'
import json, sys
from dagbuild.bench import format_bench
for f in ("bench_fanout4", "bench_chain128"):
    try:
        print(format_bench(json.load(open(f"{sys.argv[1]}/{f}.json"))), "\n")
    except Exception as e:
        print(f, "failed:", e)
PY
      ;;
    pool)
      timeout 300 python3 tools/bench_pool.py --json "$OUT/bench_pool.json" 2>&1 | tail -12 ;;
    attnbatch)  # issue 15 / 8: the batched attention (one block per KV head) from 2 rows (the default) or 1
      for ab in 2 1; do
        timeout 200 python3 tools/bench_batch.py --no-hf --contexts 128,2048 --batches 1,2,4 --steps 10 \
          --set attn_batch=$ab --json "$OUT/attn_batch_$ab.json" --png "$OUT/attn_batch_$ab.png" 2>&1 | tail -12
      done ;;
    attnkernel)  # issue 15: the batched attention alone, the spec's splits and a few others
      timeout 200 python3 tools/bench_attn.py --batches 16,64,256 --contexts 128,2048 --splits auto,1,2,4 \
        --json "$OUT/bench_attn.json" 2>&1 | grep -v -i warn ;;
    poolfused)  # issue 15: 67 buckets of the fused spec, each with the kernel its variants pick
      timeout 400 python3 tools/bench_pool.py --spec specs/llama_decode_fused.yaml --json "$OUT/bench_pool_fused.json" 2>&1 | tail -12 ;;
    poolgemm)  # issue 15: how long the GEMM path's buckets take to build (fresh nodes; 89 cuBLAS child graphs each)
      fresh_build "7 buckets" --buckets 1,8,16,32,64,128,256 ;;
    gemmpath)  # issue 15: the GEMM path (gemm_batch 12, the default) against the MV/MMA engines (gemm_batch 0), same run
      for g in 0 12; do
        timeout 150 python3 tools/bench_batch.py --no-hf --contexts 128,2048 --batches 8,16,32,64 --steps 10 --set gemm_batch=$g \
          --json "$OUT/gemm_batch_$g.json" --png "$OUT/gemm_batch_$g.png" 2>&1 | grep -E "^ *[0-9]+ |^context|pool build"
      done ;;
    gemmcu)  # issue 15: kernels/gemm.cu (the GEMM path's own GEMMs) on the GPU, per call against cuBLAS, whole steps
      timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_gemm.py 2>&1 | tail -3
      timeout 200 python3 tools/bench_gemm.py --models TinyLlama --batches 16,64 --json "$OUT/bench_gemm.json" 2>&1 | tail -11
      for t in 64 0; do
        timeout 100 python3 tools/bench_batch.py --no-hf --contexts 128 --batches 16,64 --steps 10 --set tc_batch=$t \
          --json "$OUT/batch_tc$t.json" 2>&1 | grep -E "^ *[0-9]+ |pool build"
      done ;;
    cli)
      timeout 200 python3 -m dagbuild.cli run specs/llama_decode.yaml --tokens 48 --no-progress 2>&1 | tail -8
      timeout 120 python3 -m dagbuild.cli run specs/llama_decode.yaml --config specs/configs/llama_tiny.yaml \
        --set batch=4 --tokens 16 2>&1 | tail -8
      timeout 120 python3 -m dagbuild.cli pool specs/llama_decode.yaml --config specs/configs/llama_tiny.yaml \
        --set cache_batch=8 --buckets batch=1,2,4,8 2>&1 | tail -10 ;;
    gemv)
      timeout 200 python3 tools/bench_gemv.py 2>&1 | tail -20 ;;
    probe)
      timeout 240 python3 tools/probe_graph_memory.py 2>&1 | tail -12 ;;
    cost)
      timeout 240 python3 tools/probe_build_cost.py 2>&1 | tail -14 ;;
    decode)
      timeout 300 python3 tools/bench_decode.py --json "$OUT/bench_decode.json" 2>&1 | tee "$OUT/bench_decode.log" | tail -60 ;;
    fusedbench)  # issue 8: the fused step, kernel by kernel and end to end
      timeout 240 python3 tools/bench_gemv.py --chain --pos 100,400 --json "$OUT/bench_chain.json" 2>&1 | tail -24 ;;
    models)  # issue 9: a Llama-3.2-1B shape (bf16, llama3 RoPE, tied) and a head_dim-128 7B shape in 8 layers
      timeout 200 python3 tools/bench_decode.py --config specs/configs/hf/llama-3.2-1b.json --no-kernels --steps 50 \
        --json "$OUT/bench_llama32_1b.json" 2>&1 | tail -14
      timeout 200 python3 tools/bench_decode.py --config specs/configs/hf/llama-2-7b.json --layers 8 --no-kernels \
        --steps 50 --json "$OUT/bench_llama2_7b_8l.json" 2>&1 | tail -14 ;;
    loop)  # issue 10
      timeout 240 python3 tools/bench_loop.py --json "$OUT/bench_loop.json" 2>&1 | tail -30 ;;
    loopstack)  # issue 10 with the body's layers as one kernel node (layer_kernel 2): tiny config, batch 1;
      # a smaller grid (sms 32, 16) makes each of the stack's grid-wide barriers cheaper
      for sets in "--set layer_kernel=0" "--set layer_kernel=2" "--set layer_kernel=2 --set sms=32" \
                  "--set layer_kernel=2 --set sms=16"; do
        timeout 150 python3 tools/bench_loop.py --configs specs/configs/llama_tiny.yaml --specs llama_decode_fused.yaml \
          --batches 1 --ks 1 16 64 $sets 2>&1 | tail -8
      done ;;
    prefill)  # issue 11
      timeout 200 python3 tools/bench_prefill.py --json "$OUT/bench_prefill.json" 2>&1 | tail -12 ;;
    engines)  # issue 15: GEMV vs MMA vs MV engines per projection and batch
      timeout 400 python3 tools/bench_gemv.py --batched --json "$OUT/bench_engines.json" 2>&1 | tee "$OUT/bench_engines.log" | tail -80 ;;
    mvc)  # issue 15: is the MV engine bound by the x rows every block stages? The MVC engine (K split over
      # clusters of 4: a quarter of the x bytes) against NumPy first, then the engines at 16-64 rows (mv ½SMs: half
      # the x bytes), then whole steps with and without it
      timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_llama_batched.py -k mvc 2>&1 | tail -4
      timeout 200 python3 tools/bench_gemv.py --batched --batches 16,32,64 --json "$OUT/bench_mvc.json" 2>&1 | tail -32
      for m in 0 16; do
        timeout 150 python3 tools/bench_batch.py --no-hf --contexts 128 --batches 16,64 --steps 10 --set mvc_batch=$m \
          --json "$OUT/batch_mvc$m.json" --png "$OUT/batch_mvc$m.png" 2>&1 | tail -6
      done ;;
    batch)  # issue 15
      timeout 300 python3 tools/bench_batch.py --json "$OUT/bench_batch.json" --png "$OUT/bench_batch.png" 2>&1 | tail -30 ;;
    timeline)  # issues 8/10/15: per-node increments of the fused step (CUPTI through torch.profiler)
      timeout 120 python3 tools/timeline.py --json "$OUT/timeline_tinyllama_b1.json" 2>&1 | tail -12
      timeout 120 python3 tools/timeline.py --config specs/configs/llama_tiny.yaml --json "$OUT/timeline_tiny_b1.json" 2>&1 | tail -12
      timeout 150 python3 tools/timeline.py --set batch=8 --set cache_batch=8 --json "$OUT/timeline_tinyllama_b8.json" 2>&1 | tail -12 ;;
    blocktrace)  # issue 8: per block of every node, residency, wait release and exit (-DDB_BLOCKTRACE)
      timeout 120 python3 tools/blocktrace.py --json "$OUT/blocktrace_tinyllama_b1.json" 2>&1 | tail -32
      timeout 120 python3 tools/blocktrace.py --pos 400 --json "$OUT/blocktrace_tinyllama_b1_pos400.json" 2>&1 | tail -32
      # the next knob to measure: down's 5632-wide x staged in one round trip instead of three
      timeout 120 python3 tools/blocktrace.py --define FW_X_INFLIGHT=6 --json "$OUT/blocktrace_x6.json" 2>&1 | tail -32 ;;
    layer)  # issue 8: one persistent kernel a layer (kernels/llama_layer.cu) against the five-node layers
      timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_llama_fused.py -k layer_kernel 2>&1 | tail -4
      for lk in 0 1; do
        timeout 120 python3 tools/timeline.py --set layer_kernel=$lk --json "$OUT/timeline_layer$lk.json" 2>&1 | tail -10
      done
      # where a layer's time goes: marks 0 (A done, attention barrier), 2 (A: x staged, stages consumed),
      # 3 (C: x staged, stages consumed), 1 (B and C barriers)
      for m in 0 2 3 1; do
        timeout 120 python3 tools/blocktrace.py --set layer_kernel=1 --define LY_MARKS=$m 2>&1 | grep -E "^step|^layer "
      done
      # the knobs of kernels/llama_layer.cu: no proxy fence, the next layer launched at C or D, no math (timing)
      for slots in 6 8; do  # bytes in flight: 4 slots are ~48 KiB a SM while one is read
        echo "== layer_slots $slots"
        timeout 120 python3 tools/blocktrace.py --set layer_kernel=1 --set layer_slots=$slots --define LY_MARKS=3 2>&1 | grep -E "^step|^layer "
      done
      for knob in LY_PROXY_FENCE=0 LY_TRIGGER=2 LY_TRIGGER=3 LY_DIAG=1; do
        echo "== $knob"
        timeout 120 python3 tools/blocktrace.py --set layer_kernel=1 --define LY_MARKS=2 --define $knob 2>&1 | grep -E "^step|^layer "
      done
      for tool in memcheck racecheck synccheck; do
        timeout 150 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 1 python3 \
          tools/sanitize_decode.py --spec specs/llama_decode_fused.yaml --batch 1 --set layer_kernel=1 > "$OUT/sanitize_layer_$tool.log" 2>&1
        echo "compute-sanitizer $tool, layer kernel: exit $?"; tail -2 "$OUT/sanitize_layer_$tool.log"
      done ;;
    stack)  # issue 8: the whole stack of layers as one persistent kernel (layer_kernel 2) against the five nodes
      # first a step of it alone (a hang would trap after the spin limit: fail fast), then its GPU tests
      timeout 120 python3 tools/timeline.py --set layer_kernel=2 --json "$OUT/timeline_stack.json" 2>&1 | tail -12
      timeout 120 python3 tools/timeline.py --set layer_kernel=0 --json "$OUT/timeline_five.json" 2>&1 | tail -12
      timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_llama_fused.py -k layer_kernel 2>&1 | tail -4
      for pos in 400; do
        for lk in 0 2; do
          timeout 120 python3 tools/timeline.py --set layer_kernel=$lk --pos $pos 2>&1 | grep -E "^step|untraced" | head -3
        done
      done
      ;;
    stackknobs)  # (one device call each: stack, stackknobs, stackbench)
      # the ring's depth (bytes in flight a SM), then the knobs: no math (ring and barriers alone), no proxy
      # fence, an L2 prefetch 12 stages beyond the ring, x and act staged in one round trip (8 float4 loads a
      # thread in flight)
      for slots in 8 12; do  # (multiples of the stack kernel's four warp groups)
        echo "== stack_slots $slots"
        timeout 120 python3 tools/timeline.py --set layer_kernel=2 --set stack_slots=$slots 2>&1 | grep -E "^step|untraced" | head -3
      done
      for knob in LY_DIAG=1 LY_PROXY_FENCE=0 LY_L2_AHEAD=24 LY_X_INFLIGHT=8; do
        echo "== $knob"
        timeout 120 python3 tools/blocktrace.py --set layer_kernel=2 --define $knob 2>&1 | grep -E "^step|^layers" | head -4
      done
      ;;
    stackbench)
      timeout 300 python3 tools/bench_decode.py --config specs/configs/tinyllama.yaml --no-kernels 2>&1 | tail -16
      timeout 150 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 python3 \
        tools/sanitize_decode.py --spec specs/llama_decode_fused.yaml --batch 1 --set layer_kernel=2 > "$OUT/sanitize_stack.log" 2>&1
      echo "compute-sanitizer memcheck, whole stack: exit $?"; tail -2 "$OUT/sanitize_stack.log" ;;
    attnab)  # issue 8: batch 1's attention, where it triggers and how long its splits are (tools/bench_ab.py), after
      # the GPU tests of the files that run it; the trigger-1 copy from tools/spec_variant.py
      timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_llama_fused.py tests/gpu/test_llama_hf.py \
        tests/gpu/test_llama_loop.py 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tail -8
      python3 tools/spec_variant.py --option attn=-DATTN_TRIGGER=1 -o "$OUT/trig1.yaml" >/dev/null
      timeout 300 python3 tools/bench_ab.py --variant trig0 --variant "trig1=$OUT/trig1.yaml" \
        --variant c192=:attn_decode_chunk=192 --variant c384=:attn_decode_chunk=384 --variant c512=:attn_decode_chunk=512 \
        --contexts 128,512,1024,2048 --rounds 3 --steps 20 --json "$OUT/attnab.json" 2>&1 | grep -v -i warn ;;
    cachelines)  # issue 8: batch 1's GEMVs built with only the 1-row chunk's code (FW_ONE_ROW) and with their weight
      # copies evict-first in L2 (DB_EVICT_FIRST), each alone and both (the spec's batch-1 forms, gemv_one_row 1), against
      # the forms every small batch runs (gemv_one_row 0); then each variant's 300 greedy tokens (they must match)
      V=$OUT/variants; mkdir -p "$V"; ONE=""; EF=""
      for k in qkv gemv_res gate_up gemv_norm; do ONE="$ONE --option $k=-DFW_ONE_ROW=1"; EF="$EF --option $k=-DDB_EVICT_FIRST=1"; done
      python3 tools/spec_variant.py -o "$V/onerow.yaml" $ONE >/dev/null
      python3 tools/spec_variant.py -o "$V/ef.yaml" $EF >/dev/null
      timeout 300 python3 tools/bench_ab.py --variant base=:gemv_one_row=0 --variant "onerow=$V/onerow.yaml:gemv_one_row=0" \
        --variant "ef=$V/ef.yaml:gemv_one_row=0" --variant batch1_forms --batches 1 --contexts 128,2048 --rounds 3 \
        --steps 30 --json "$OUT/cachelines.json" 2>&1 | grep -v -i warn | tail -12
      tokens_md5 specs/llama_decode_fused.yaml --set gemv_one_row=0
      tokens_md5 "$V/onerow.yaml" --set gemv_one_row=0
      tokens_md5 "$V/ef.yaml" --set gemv_one_row=0
      tokens_md5 specs/llama_decode_fused.yaml ;;
    stalls)  # issue 8: Nsight Compute's warp stall reasons of the fused step's GEMVs and attention inside the graph,
      # caches flushed before each kernel (all) and not (none): a large no_instruction share means cold code
      M=gpu__time_duration.sum,smsp__inst_executed.sum
      for r in no_instruction long_scoreboard wait barrier membar short_scoreboard math_pipe_throttle lg_throttle \
               mio_throttle dispatch_stall branch_resolving not_selected selected sleeping drain imc_miss misc; do
        M=$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio
      done
      for cc in all none; do
        timeout 200 ncu --graph-profiling node --cache-control $cc --kernel-name regex:'attn_decode|qkv_rope|gemv_res|gate_up' \
          --launch-skip 300 --launch-count 10 --metrics "$M" --csv --page raw --log-file "$OUT/stalls_$cc.csv" \
          python3 -m dagbuild.cli run specs/llama_decode_fused.yaml --tokens 16 --no-progress > /dev/null 2>&1
        echo "ncu, cache-control $cc: exit $?"
        python3 tools/ncu_table.py "$OUT/stalls_$cc.csv"
      done ;;
    tcwide)  # issue 15: our own GEMMs (kernels/gemm.cu) above 32 rows against cuBLAS: if they hold up, buckets above
      # tc_batch record no cuBLAS child graphs (most of the 67-bucket pool build) and need no cuBLAS workspace
      timeout 240 python3 tools/bench_ab.py --variant cublas --variant own=:tc_batch=256 --batches 40,64,128,256 \
        --contexts 128,2048 --rounds 2 --steps 10 --json "$OUT/tcwide.json" 2>&1 | grep -v -i warn | tail -14
      timeout 150 python3 tools/bench_ab.py --variant cublas --variant own=:tc_batch=768 --batches 512,768 --contexts 128 \
        --rounds 2 --steps 10 --json "$OUT/tcwide2.json" 2>&1 | grep -v -i warn | tail -8
      timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_llama_batched.py -k every_bucket 2>&1 \
        | grep -E "^(FAILED|ERROR)|passed|failed" | tail -6 ;;
    poolprof)  # issue 15: where the fused spec's fresh 67-bucket build spends its host time (cProfile, both orders)
      timeout 200 python3 tools/bench_pool.py --only fresh --profile --spec specs/llama_decode_fused.yaml 2>&1 | tail -1 \
        | python3 -c "import json, sys; d = json.loads(sys.stdin.read()); print('build', round(d['build_s'], 3), 's'); print(d['profile'])" \
        > "$OUT/poolprof.txt"; head -1 "$OUT/poolprof.txt" ;;
    attnskip)  # issue 8: what attention's work after its wait costs (timing ablations, wrong results: ATTN_SKIP 1
      # writes q as the output right after the wait, 2 runs the first tile only) at contexts of one tile (64), two
      # (160) and many (2048): if skipping saves most of attention's ~7 us a layer, its own chain is the cost
      V=$OUT/variants; mkdir -p "$V"
      for k in 1 2; do python3 tools/spec_variant.py -o "$V/skip$k.yaml" --option "attn=-DATTN_SKIP=$k" >/dev/null; done
      timeout 220 python3 tools/bench_ab.py --variant shipped --variant "skip1=$V/skip1.yaml" --variant "skip2=$V/skip2.yaml" \
        --batches 1 --contexts 64,160,2048 --rounds 3 --steps 30 --json "$OUT/attnskip.json" 2>&1 | grep -v -i warn | tail -12 ;;
    attngroup)  # issue 8: attention's chain after its wait, shortened: per-lane-group online softmax (no barrier or
      # block-wide reduction a tile; ATTN_GROUPED) and the second tile's K/V issued before the wait (ATTN_PRELOAD2)
      V=$OUT/variants; mkdir -p "$V"
      python3 tools/spec_variant.py -o "$V/g1.yaml" --option "attn=-DATTN_GROUPED=1" >/dev/null
      python3 tools/spec_variant.py -o "$V/g2.yaml" --option "attn=-DATTN_GROUPED=1" --option "attn=-DATTN_PRELOAD2=1" >/dev/null
      timeout 240 python3 tools/bench_ab.py --variant shipped --variant "grouped=$V/g1.yaml" --variant "grouped2=$V/g2.yaml" \
        --batches 1 --contexts 64,160,2048 --rounds 3 --steps 30 --json "$OUT/attngroup.json" 2>&1 | grep -v -i warn | tail -12
      for s in specs/llama_decode_fused.yaml $V/g1.yaml $V/g2.yaml; do tokens_md5 $s; done ;;
    qkvgrid)  # issue 8: the batch-1 QKV GEMV's grid: 160 blocks (the rule: 28 SMs take a second block only as the
      # down GEMV's leave), one an SM (132: 224 warps take two pairs) or 80 (every warp two pairs); same tokens
      timeout 200 python3 tools/bench_ab.py --variant shipped --variant g132=:gemv_qkv_grid=132 --variant g80=:gemv_qkv_grid=80 \
        --batches 1 --contexts 128,2048 --rounds 3 --steps 30 --json "$OUT/qkvgrid.json" 2>&1 | grep -v -i warn | tail -10
      for g in 0 132; do tokens_md5 specs/llama_decode_fused.yaml --set gemv_qkv_grid=$g; done ;;
    gemmpad)  # issue 15: cuBLAS over rows rounded up to 64 (gemm_pad): the fused spec's fresh 67-bucket build (12
      # distinct m instead of 60: cuBLAS plans each new shape for milliseconds), the steps at 40-520 rows, and the
      # every-bucket GPU test with padded rows
      for p in 1 64; do fresh_build "gemm_pad $p" --set gemm_pad=$p; done
      timeout 240 python3 tools/bench_ab.py --variant exact --variant pad64=:gemm_pad=64 --batches 40,72,136,272,520 \
        --contexts 128 --rounds 2 --steps 10 --json "$OUT/gemmpad.json" 2>&1 | grep -v -i warn | tail -12
      timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_llama_batched.py -k "every_bucket and padded" \
        2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tail -6 ;;
    capcost)  # issue 15: where a cuBLAS child recording's host time goes (capture, the call, threads)
      timeout 200 python3 tools/probe_capture_cost.py 2>&1 | tail -14 ;;
    sanitize_fused)
      for tool in memcheck racecheck synccheck; do
        timeout 150 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 1 python3 \
          tools/sanitize_decode.py --spec specs/llama_decode_fused.yaml > "$OUT/sanitize_fused_$tool.log" 2>&1
        echo "compute-sanitizer $tool on llama_decode_fused: exit $?"; tail -2 "$OUT/sanitize_fused_$tool.log"
      done ;;
    sanitize)
      for spec in llama_decode llama_decode_fused; do
        for tool in memcheck racecheck synccheck initcheck; do
          timeout 120 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 1 python3 \
            tools/sanitize_decode.py --spec specs/$spec.yaml > "$OUT/sanitize_${spec}_$tool.log" 2>&1
          echo "compute-sanitizer $tool on $spec: exit $?"; tail -2 "$OUT/sanitize_${spec}_$tool.log"
        done
      done ;;
  esac
done
