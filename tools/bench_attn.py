"""Batched decode attention alone (kernels/llama_batched.cu): device µs a call and GB/s of KV cache read, one GPU.

The GEMM path's attn_qkv_mma_<wt> (tensor cores; the fused spec's with attn_mma 1) and attn_qkv_<wt> (RoPE, KV
append and the cast folded into both), and attn_decode_batched, 32 query heads of head_dim 64 in 4 KV heads
(TinyLlama; --kv-heads 8: Llama-3.2-1B), every row at position --contexts - 1, for each batch of --batches and each
split count of --splits ("auto" is the fused spec's grid:
min(ceil_div(max_seq, attn_chunk), ceil_div(sms, batch * kv_heads))). 20 calls a CuPy-captured graph, median
of 5 replays. Each -D variant of --variant (NAME=V,NAME=V; "base" is the source's defaults) is its own module:
prebuild them with --prebuild (no GPU needed) and carry the cache directory, or the GPU machine compiles them
(NVRTC: about a minute each). --source runs another copy of the kernels (an A/B against an older version).

    python3 tools/bench_attn.py --prebuild --variant base --variant AB_UNROLL=1
    python3 tools/bench_attn.py --batches 16,64,256 --contexts 128,2048 --splits auto,1,2,4 --variant base ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SRC = ROOT / "kernels" / "llama_batched.cu"
BASE_OPTIONS = ("-DMMA_CLUSTER=8", "-DATTN_BATCHED_TRIGGER=1")  # the fused spec's options for attn_qkv
HEADS, KV_HEADS, HEAD_DIM, CHUNK, MIN_KEYS, SMS = 32, 4, 64, 64, 64, 132  # the fused spec's dims (TinyLlama)
MMA_KEYS = 256  # attn_mma_keys: the fewest keys a split of attn_qkv_mma takes
WIDE_BATCH, WIDE_KEYS = 48, 128  # from attn_wide_batch rows a split takes at least attn_wide_keys keys
CALLS, REPS = 20, 5


def variant_options(variant: str) -> tuple[str, ...]:
    """``base`` → the spec's options; ``A=1,B=2`` → those plus -DA=1 -DB=2."""
    extra = () if variant == "base" else tuple(f"-D{d}" for d in variant.split(","))
    return BASE_OPTIONS + extra


def min_keys(batch: int, kernel: str = "attn_qkv_mma_f16") -> int:
    """The fewest keys a split takes at ``batch`` rows (the fused spec's attention ``chunk`` argument)."""
    least = MMA_KEYS if kernel.startswith("attn_qkv_mma") else MIN_KEYS
    return max(least, WIDE_KEYS * (batch >= WIDE_BATCH))


def mma_shared(head_dim: int) -> int:
    """attn_qkv_mma's dynamic shared memory (the fused spec's `shared` for it)."""
    return 4 * max(128 * (2 * head_dim + 12) + 8 * (head_dim + 8) + 2 * head_dim, 11264)


def auto_splits(batch: int, max_seq: int, kv_heads: int = KV_HEADS) -> int:
    """The fused spec's attention grid (y) for groups of at most 16 query heads."""
    return min(-(-max_seq // CHUNK), -(-SMS // (batch * kv_heads)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="16,64,256")
    ap.add_argument("--contexts", default="128,2048")
    ap.add_argument("--splits", default="auto", help="comma-separated split counts, or auto (the spec's)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=V,... or base (repeatable)")
    ap.add_argument("--kernel", default="attn_qkv_mma_f16",
                    help="comma-separated, of attn_qkv_mma_f16, attn_qkv_f16, attn_decode_batched_f16")
    ap.add_argument("--prebuild", action="store_true", help="only compile the variants into the kernel cache")
    ap.add_argument("--kv-heads", type=int, default=KV_HEADS,
                    help=f"KV heads of the {HEADS} query heads (default {KV_HEADS}: TinyLlama; 8: Llama-3.2-1B)")
    ap.add_argument("--source", default=str(SRC), help="the kernel source (e.g. an older copy, for A/B)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.kv_heads < 1 or HEADS % args.kv_heads:
        ap.error(f"--kv-heads must divide the {HEADS} query heads (got {args.kv_heads})")
    variants = args.variant or ["base"]
    names = args.kernel.split(",")
    known = ("attn_qkv_mma_f16", "attn_qkv_f16", "attn_decode_batched_f16")
    if any(k not in known for k in names):
        ap.error(f"--kernel takes {', '.join(known)} (got {args.kernel})")

    from dagbuild import kernels
    from dagbuild.sources import read_kernel_source

    source = read_kernel_source(Path(args.source))
    if args.prebuild:
        for v in variants:
            print(v, kernels.module_image(source, "attn_bench", "sm_90", variant_options(v)), flush=True)
        return 0

    import cupy as cp

    from dagbuild.llama import reference as ref

    kvh = args.kv_heads
    rows = []
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{name} · heads {HEADS}/{kvh} · head_dim {HEAD_DIM} · µs a call (GB/s of KV)")
    mods = {v: kernels.load_module(source, "attn_bench", variant_options(v)) for v in variants}
    columns = [(k, v) for k in names for v in variants]
    stream = cp.cuda.Stream(non_blocking=True)
    for ctx in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            max_seq = ctx + 64
            rng = np.random.default_rng(0)
            width = (HEADS + 2 * kvh) * HEAD_DIM
            qkv = cp.asarray(rng.standard_normal((batch, width), dtype=np.float32))
            q = cp.asarray(rng.standard_normal((batch, HEADS * HEAD_DIM), dtype=np.float32))
            kc = cp.asarray(rng.standard_normal((batch, kvh, max_seq, HEAD_DIM)).astype(np.float16))  # wt caches
            vc = cp.asarray(rng.standard_normal((batch, kvh, max_seq, HEAD_DIM)).astype(np.float16))
            pos = cp.full(batch, ctx - 1, np.int32)
            bias = cp.zeros(width, np.float32)
            inv_freq = cp.asarray(ref.rope_inv_freq(HEAD_DIM, 10000.0))
            nsplit_max = -(-max_seq // CHUNK)
            part_o = cp.zeros(batch * HEADS * nsplit_max * HEAD_DIM, np.float32)
            part_ml = cp.zeros(batch * HEADS * nsplit_max * 2, np.float32)
            counters = cp.zeros(batch * HEADS, np.int32)
            out_h = cp.zeros(batch * HEADS * HEAD_DIM, np.float16)
            out_f = cp.zeros(batch * HEADS * HEAD_DIM, np.float32)
            kv_bytes = 2 * batch * kvh * ctx * HEAD_DIM * 2
            cp.cuda.Device().synchronize()  # the arrays above are filled on the null stream, the graph runs on `stream`
            for split_arg in args.splits.split(","):
                splits = auto_splits(batch, max_seq, kvh) if split_arg == "auto" else min(int(split_arg), nsplit_max)
                line = {"context": ctx, "batch": batch, "splits": splits, "split_arg": split_arg}
                for kname, v in columns:
                    fn = mods[v].get_function(kname)
                    smem = 0
                    if kname.startswith("attn_qkv_mma"):
                        smem = fn.max_dynamic_shared_size_bytes = mma_shared(HEAD_DIM)
                    sc = np.float32(HEAD_DIM ** -0.5)
                    common = (part_o, part_ml, counters, out_h if kname.endswith("f16") else out_f, np.int32(HEADS),
                              np.int32(kvh), np.int32(HEAD_DIM), np.int32(max_seq),
                              np.int32(min_keys(batch, kname)), sc)
                    params = ((qkv, kc, vc, pos, bias, inv_freq, *common) if kname.startswith("attn_qkv")
                              else (q, kc, vc, pos, *common))
                    with stream:
                        stream.begin_capture()
                        for _ in range(CALLS):
                            fn((batch * kvh, splits), (256,), params, shared_mem=smem)
                        graph = stream.end_capture()
                        graph.launch(stream)
                        stream.synchronize()
                        times = []
                        for _ in range(REPS):
                            s, e = cp.cuda.Event(), cp.cuda.Event()
                            s.record(stream)
                            graph.launch(stream)
                            e.record(stream)
                            e.synchronize()
                            times.append(cp.cuda.get_elapsed_time(s, e) * 1e3 / CALLS)
                    line[f"{kname}:{v}"] = statistics.median(times)
                rows.append(line)
                print(f"ctx {ctx:>5} batch {batch:>4} splits {splits:>3} ({split_arg:>4}): " + "  ".join(
                    f"{k}:{v} {line[f'{k}:{v}']:7.2f} ({kv_bytes / line[f'{k}:{v}'] / 1e3:5.0f})"
                    for k, v in columns), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "kernels": names, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
