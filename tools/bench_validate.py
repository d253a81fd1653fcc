"""Time validation of a ~1,000-node spec: parse + plan (bind, infer edges, races, cycles) + reduce.

The spec is a Llama-style decode step: 64 layers × 16 nodes in one ``repeat``, every weight a view
(``wq[l]``) of a stacked buffer, the KV cache written at ``kcache[l, pos]``, activations reused across
layers, so inference sees real RAW/WAR/WAW hazards. Prints the median of 5 runs.

    python tools/bench_validate.py [--layers 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dagbuild.load import parse_spec  # noqa: E402
from dagbuild.plan import plan  # noqa: E402

NODES_PER_LAYER = 16

# Kernel bodies are never compiled here: validation only reads the declared params.
_KERNELS = {
    "rmsnorm": "const f32* x, const wt* w, f32* y, i32 n",
    "gemv": "const wt* w, const f32* x, f32* y, i32 rows, i32 cols",
    "rope": "f32* x, i32 pos, i32 n, i32 head_dim",
    "kv_store": "const f32* k, const f32* v, wt* kc, wt* vc, i32 n",
    "attention": "const f32* q, const wt* kc, const wt* vc, f32* out, i32 pos, i32 heads, i32 head_dim",
    "add": "const f32* a, f32* x, i32 n",
    "silu_mul": "const f32* g, const f32* u, f32* y, i32 n",
}


def spec_text(layers: int = 64) -> str:
    """YAML of the benchmark spec: 16 nodes per layer, plus upload, final norm, lm head and download."""
    kernels = "".join(
        f"  {name}:\n    code: |\n      extern \"C\" __global__ void {name}() {{}}\n"
        f"    entry: {name}\n    params: [{params}]\n" for name, params in _KERNELS.items())
    return f"""\
dagbuild: 1
name: bench_validate
dims: {{layers: {layers}, d: 2048, ffn: 5632, heads: 32, head_dim: 64, ctx: 2048, vocab: 32000, pos: 17}}
types: {{wt: f16}}
kernels:
{kernels}buffers:
  x_host: {{dtype: f32, shape: [d], memory: pinned}}
  logits_host: {{dtype: f32, shape: [vocab], memory: pinned}}
  x: {{dtype: f32, shape: [d]}}
  h: {{dtype: f32, shape: [d]}}
  qkv: {{dtype: f32, shape: [3, d]}}
  att: {{dtype: f32, shape: [d]}}
  tmp: {{dtype: f32, shape: [d]}}
  gu: {{dtype: f32, shape: [2, ffn]}}
  act: {{dtype: f32, shape: [ffn]}}
  logits: {{dtype: f32, shape: [vocab]}}
  norm_w: {{dtype: wt, shape: [layers, 2, d]}}
  final_norm_w: {{dtype: wt, shape: [d]}}
  wqkv: {{dtype: wt, shape: [layers, 3, d, d]}}
  wo: {{dtype: wt, shape: [layers, d, d]}}
  wgu: {{dtype: wt, shape: [layers, 2, ffn, d]}}
  wd: {{dtype: wt, shape: [layers, d, ffn]}}
  lm_head: {{dtype: wt, shape: [vocab, d]}}
  kcache: {{dtype: wt, shape: [layers, ctx, d]}}
  vcache: {{dtype: wt, shape: [layers, ctx, d]}}
nodes:
  - {{id: upload, memcpy: {{dst: x, src: x_host}}}}
  - repeat: {{var: l, count: layers}}
    nodes:
      - {{id: "attn_norm.{{l}}", kernel: rmsnorm, grid: [1], block: [1024],
         args: {{x: x, w: "norm_w[l, 0]", y: h, n: d}}}}
      - {{id: "q.{{l}}", kernel: gemv, grid: ["ceil_div(d, 8)"], block: [256],
         args: {{w: "wqkv[l, 0]", x: h, y: "qkv[0]", rows: d, cols: d}}}}
      - {{id: "k.{{l}}", kernel: gemv, grid: ["ceil_div(d, 8)"], block: [256],
         args: {{w: "wqkv[l, 1]", x: h, y: "qkv[1]", rows: d, cols: d}}}}
      - {{id: "v.{{l}}", kernel: gemv, grid: ["ceil_div(d, 8)"], block: [256],
         args: {{w: "wqkv[l, 2]", x: h, y: "qkv[2]", rows: d, cols: d}}}}
      - {{id: "rope_q.{{l}}", kernel: rope, grid: [heads], block: ["head_dim // 2"],
         args: {{x: "qkv[0]", pos: pos, n: d, head_dim: head_dim}}}}
      - {{id: "rope_k.{{l}}", kernel: rope, grid: [heads], block: ["head_dim // 2"],
         args: {{x: "qkv[1]", pos: pos, n: d, head_dim: head_dim}}}}
      - {{id: "kv.{{l}}", kernel: kv_store, grid: ["ceil_div(d, 256)"], block: [256],
         args: {{k: "qkv[1]", v: "qkv[2]", kc: "kcache[l, pos]", vc: "vcache[l, pos]", n: d}}}}
      - {{id: "attn.{{l}}", kernel: attention, grid: [heads], block: [128], shared: "(pos + 1) * 4",
         args: {{q: "qkv[0]", kc: "kcache[l]", vc: "vcache[l]", out: att, pos: pos, heads: heads,
                head_dim: head_dim}}}}
      - {{id: "o.{{l}}", kernel: gemv, grid: ["ceil_div(d, 8)"], block: [256],
         args: {{w: "wo[l]", x: att, y: tmp, rows: d, cols: d}}}}
      - {{id: "res1.{{l}}", kernel: add, grid: ["ceil_div(d, 256)"], block: [256], args: {{a: tmp, x: x, n: d}}}}
      - {{id: "ffn_norm.{{l}}", kernel: rmsnorm, grid: [1], block: [1024],
         args: {{x: x, w: "norm_w[l, 1]", y: h, n: d}}}}
      - {{id: "gate.{{l}}", kernel: gemv, grid: ["ceil_div(ffn, 8)"], block: [256],
         args: {{w: "wgu[l, 0]", x: h, y: "gu[0]", rows: ffn, cols: d}}}}
      - {{id: "up.{{l}}", kernel: gemv, grid: ["ceil_div(ffn, 8)"], block: [256],
         args: {{w: "wgu[l, 1]", x: h, y: "gu[1]", rows: ffn, cols: d}}}}
      - {{id: "silu.{{l}}", kernel: silu_mul, grid: ["ceil_div(ffn, 256)"], block: [256],
         args: {{g: "gu[0]", u: "gu[1]", y: act, n: ffn}}}}
      - {{id: "down.{{l}}", kernel: gemv, grid: ["ceil_div(d, 8)"], block: [256],
         args: {{w: "wd[l]", x: act, y: tmp, rows: d, cols: ffn}}}}
      - {{id: "res2.{{l}}", kernel: add, grid: ["ceil_div(d, 256)"], block: [256], args: {{a: tmp, x: x, n: d}}}}
  - {{id: final_norm, kernel: rmsnorm, grid: [1], block: [1024], args: {{x: x, w: final_norm_w, y: h, n: d}}}}
  - {{id: lm_head, kernel: gemv, grid: ["ceil_div(vocab, 8)"], block: [256],
     args: {{w: lm_head, x: h, y: logits, rows: vocab, cols: d}}}}
  - {{id: download, memcpy: {{dst: logits_host, src: logits}}}}
"""


def validate(text: str):
    """parse + plan (bind, infer, cycles, reduce, summary): what ``dagbuild validate`` does."""
    return plan(parse_spec(text))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    text = spec_text(args.layers)
    times, p = [], None
    for _ in range(args.runs):
        t0 = time.perf_counter()
        p = validate(text)
        times.append(time.perf_counter() - t0)
    s = p.summary
    print(f"{s['nodes']} nodes ({args.layers} layers × {NODES_PER_LAYER} + 4), {s['edges']} edges → "
          f"{s['edges_reduced']} after reduction, critical path {s['critical_path']}, max width {s['max_width']}")
    print(f"parse + plan + reduce: median {statistics.median(times) * 1e3:.1f} ms over {args.runs} runs "
          f"(min {min(times) * 1e3:.1f} ms, Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
