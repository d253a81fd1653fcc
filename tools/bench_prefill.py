#!/usr/bin/env python3
"""Time to first token: dagbuild's prefill graphs vs HF transformers (sdpa, one forward) vs today's
per-position prefill through the fused decode graph; the MLP GEMMs' tensor throughput; bucket build time.

Modes, per prompt length (batch 1, one random prompt, host-observed ms from the prompt's upload to the first
token on the host, median of --reps after one warm-up):
  graphs     Prefiller.run: one prefill graph launch per chunk (the largest bucket covers 2,048 tokens).
  positions  LlamaDecoder.generate(prompt, 1) without prefill graphs: one decode-graph launch per position
             (one run; it is slow by design).
  hf         LlamaForCausalLM(input_ids) in f16 with attn_implementation="sdpa", one forward with
             use_cache=False, then argmax of the last logits (torch.cuda.synchronize before the clock stops).
MLP GEMMs: gate/up [seq, hidden] x [2*ffn, hidden]^T and down [seq, ffn] x [hidden, ffn]^T through the same
cuBLAS calls the child graphs record, timed with CUDA events over --gemm-reps back-to-back calls; TFLOP/s
against --peak-tflops (dense f16 tensor throughput: 989 for an H200 SXM).
Build: GraphPool of every bucket (16 ... 2048): bind, record each child graph, instantiate.

  python3 tools/bench_prefill.py                                   # TinyLlama shape, f16
  python3 tools/bench_prefill.py --lengths 128,512 --no-positions --json out.json
  python3 tools/bench_prefill.py --config specs/configs/hf/llama-2-7b.json --layers 8   # head_dim 128, f16
  python3 tools/bench_prefill.py --config specs/configs/hf/qwen2-0.5b.json               # Q/K/V biases, bf16
An HF config.json brings its dims, consts, RoPE, biases and tied head (the HF model is built from it, and the
graphs load the HF model's weights, so both run the same model); a dims YAML is a Llama of those dims.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dagbuild.data import shipped_spec  # noqa: E402
from dagbuild.executable import Executable  # noqa: E402
from dagbuild.llama.decode import LlamaDecoder, llama_plan  # noqa: E402
from dagbuild.llama.prefill import Prefiller  # noqa: E402
from dagbuild.llama.weights import load_state_dict, random_hf_model, random_weights, tied_bound  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
from bench_decode import load_config  # noqa: E402  (dims YAML or HF config.json -> plan overrides)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def gemm_tflops(exe, m: int, n: int, k: int, wt: str, reps: int) -> tuple[float, float]:
    """(ms per call, TFLOP/s) of the child graphs' GEMM c[m, n] = a[m, k] @ b[n, k]^T, f32 out."""
    import cupy

    npdt = {"f16": np.float16, "bf16": np.uint16, "f32": np.float32}[wt]
    a = cupy.zeros((m, k), npdt)
    b = cupy.zeros((n, k), npdt)
    c = cupy.zeros((m, n), np.float32)
    ws = cupy.zeros(32 << 20, np.uint8)
    args = (("a", wt, a.data.ptr), ("b", wt, b.data.ptr), ("c", "f32", c.data.ptr), ("m", "i32", m),
            ("n", "i32", n), ("k", "i32", k), ("alpha", "f32", 1.0), ("beta", "f32", 0.0),
            ("workspace", "u8", (ws.data.ptr, ws.nbytes)))
    s = cupy.cuda.Stream(non_blocking=True)
    for _ in range(3):
        exe.backend.library_call("gemm", args, s.ptr)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(s)
    for _ in range(reps):
        exe.backend.library_call("gemm", args, s.ptr)
    stop.record(s)
    stop.synchronize()
    ms = cupy.cuda.get_elapsed_time(start, stop) / reps
    return ms, 2.0 * m * n * k / (ms * 1e-3) / 1e12


def hf_ttft(model, prompt: list[int], reps: int) -> tuple[float, int]:
    """(median ms, first token) of HF's forward over the prompt and argmax of the last logits."""
    import torch

    ids = torch.tensor([prompt], dtype=torch.long, device="cuda")
    times, token = [], -1
    with torch.inference_mode():
        for i in range(reps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            token = int(torch.argmax(model(input_ids=ids, use_cache=False).logits[0, -1]))
            torch.cuda.synchronize()
            if i:
                times.append((time.perf_counter() - t0) * 1e3)
    return _median(times), token


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "specs" / "configs" / "tinyllama.yaml"),
                    help="dims YAML, or an HF config.json / checkpoint directory")
    ap.add_argument("--wt", choices=("f16", "bf16", "f32"), help="weight type (default: f16, or the HF config's)")
    ap.add_argument("--layers", type=int, help="override the layer count (a 7B shape in fewer layers)")
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gemm-reps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense f16 tensor TFLOP/s of the GPU")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-positions", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    overrides, hf_config, mconf = load_config(Path(args.config), args)
    overrides["max_seq"] = max(int(overrides.get("max_seq", 512)), 2048, max(lengths) + 16)
    wt = overrides["wt"]
    p = llama_plan({**overrides, "batch": 1}, spec_path=shipped_spec("llama_decode_fused.yaml"))
    dims = {**p.dims, **p.consts}
    out: dict = {"config": args.config, "wt": wt, "dims": dims, "ttft_ms": {}}
    model = None
    if not args.no_hf:
        model = random_hf_model(p.dims, config=hf_config, dtype=wt, seed=0, attn_implementation="sdpa")
    tied = bool(mconf and mconf.tied)
    with Executable(p, bound=tied_bound(p) if tied else None) as exe:
        if model is not None:
            load_state_dict(exe, model.state_dict(), mconf)
        else:
            random_weights(exe, 0, rope=mconf.rope if mconf else None)
        dec = LlamaDecoder(exe)
        t0 = time.perf_counter()
        pf = Prefiller(exe)
        out["build_s"] = time.perf_counter() - t0
        out["buckets"] = pf.buckets
        print(f"prefill graphs: {len(pf.buckets)} buckets {pf.buckets} built in {out['build_s']:.2f} s "
              f"({len(pf.pool.largest_plan.nodes)} nodes each)")
        try:
            rng = np.random.default_rng(0)
            for n in lengths:
                prompt = rng.integers(0, int(dims["vocab"]), n).tolist()
                row: dict = {}
                dec.reset()
                first = pf.run([prompt])[0][0]
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    pf.run([prompt])
                    times.append((time.perf_counter() - t0) * 1e3)
                row["graphs"] = _median(times)
                if not args.no_positions:
                    row["positions"] = dec.generate([prompt], 1).ttft_ms
                hf_token = None
                if model is not None:
                    row["hf_sdpa"], hf_token = hf_ttft(model, prompt, args.reps)
                out["ttft_ms"][n] = row
                out.setdefault("first_token", {})[n] = {"graphs": first, "hf_sdpa": hf_token}
                same = "" if hf_token is None else f"; first token {first} vs HF {hf_token}"
                print(f"TTFT {n:5d} tokens: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items()) + same)
            m = max(lengths)
            hid, ffn = int(dims["hidden"]), int(dims["ffn"])
            gemms = {}
            for name, (nn, kk) in {"gate_up": (2 * ffn, hid), "down": (hid, ffn)}.items():
                ms, tf = gemm_tflops(exe, m, nn, kk, wt, args.gemm_reps)
                gemms[name] = {"m": m, "n": nn, "k": kk, "ms": ms, "tflops": tf, "of_peak": tf / args.peak_tflops}
                print(f"MLP GEMM {name} [{m} x {kk}] x [{nn} x {kk}]^T: {ms:.3f} ms, {tf:.0f} TFLOP/s = "
                      f"{100 * tf / args.peak_tflops:.0f} % of {args.peak_tflops:.0f}")
            out["mlp_gemms"] = gemms
        finally:
            pf.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
