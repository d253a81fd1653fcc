"""GEMV kernels at the Llama decode shapes, and the fused decode layers back to back: device µs, one run, one GPU.

Three parts (any combination; default: --legacy):

  --legacy  the kernels/llama.cu GEMVs (gemv, gemvw) at the TinyLlama shapes, as before.
  --fused   every GEMV kernel of kernels/llama_fused.cu (qkv_rope, gemv_res for o and down, gate_up_silu,
            gemv_norm for the LM head) at every GEMV shape of TinyLlama (f16) and Llama-3.2-1B (bf16), for
            each batch of --batches: 40 calls per graph, rotating over enough weight copies (>= 3x the L2)
            that every call reads its weights from DRAM; once in a CuPy-captured graph (plain edges) and once
            in an explicit graph whose 40 nodes are chained by programmatic (PDL) edges. µs per call, GB/s
            of weights, % of the device-to-device copy bandwidth measured in the same run. Launch shapes: the
            spec's (at most one block per SM, pairs spread evenly); --variants adds, at batch 1 and 8, up to
            two blocks per SM, one row pair per warp, and the spec's grid without the shared-memory ring.
  --chain   the fused kernels of all layers (5 per layer) launched back to back: CuPy-captured (no PDL),
            explicit plain edges, explicit programmatic edges; then the whole decode step of
            specs/llama_decode_fused.yaml (plain and PDL) and of specs/llama_decode.yaml, device time per
            step of back-to-back launches, and host-observed ms per step (launch + wait), at position --pos.

    python tools/bench_gemv.py --fused --chain [--batches 1,2,4,8,16,64] [--json out.json]
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
sys.path.insert(0, str(ROOT / "tools"))

from dagbuild.bench import copy_bandwidth  # noqa: E402
from dagbuild.kernels import load_module  # noqa: E402
from dagbuild.sources import read_kernel_source  # noqa: E402

SHAPES = {"q/o_proj": (2048, 2048), "k/v_proj": (256, 2048), "gate/up": (5632, 2048), "down": (2048, 5632),
          "lm_head": (32000, 2048)}
ROWS = {"gemv": 4, "gemvw": 16}
MODELS = {  # name: dims, weight type
    "TinyLlama": ({"hidden": 2048, "heads": 32, "kv_heads": 4, "head_dim": 64, "ffn": 5632, "vocab": 32000,
                   "layers": 22}, "f16"),
    "Llama-3.2-1B": ({"hidden": 2048, "heads": 32, "kv_heads": 8, "head_dim": 64, "ffn": 8192, "vocab": 128256,
                      "layers": 16}, "bf16"),
}
CALLS = 40
REPS = 5


def time_graph(cp, launch, stream, reps: int = REPS) -> float:
    """ms per replay of `launch()` (one graph), after one warm-up replay."""
    launch()
    s, e = cp.cuda.Event(), cp.cuda.Event()
    s.record(stream)
    for _ in range(reps):
        launch()
    e.record(stream)
    e.synchronize()
    return cp.cuda.get_elapsed_time(s, e) / reps


# ---------------------------------------------------------------------------------------------------------
# legacy: kernels/llama.cu
# ---------------------------------------------------------------------------------------------------------


def legacy(cp, wt: str, batches: list[int], bw: float) -> None:
    mod = load_module(read_kernel_source(ROOT / "kernels" / "llama.cu"), "llama")
    dt = {"f16": np.float16, "f32": np.float32, "bf16": np.uint16}[wt]
    s, e = cp.cuda.Event(), cp.cuda.Event()
    l2 = cp.cuda.runtime.getDeviceProperties(0)["l2CacheSize"]
    stream = cp.cuda.Stream(non_blocking=True)
    for batch in batches:
        for name, (n, k) in SHAPES.items():
            wbytes = n * k * np.dtype(dt).itemsize
            copies = max(2, -(-3 * l2 // wbytes))
            ws = [cp.asarray((np.random.default_rng(i).standard_normal((n, k)) * 0.02).astype(np.float32)).astype(dt)
                  if wt != "bf16" else cp.random.randint(0, 2**15, (n, k)).astype(cp.uint16)
                  for i in range(copies)]
            x = cp.asarray(np.random.default_rng(9).standard_normal((batch, k)).astype(np.float32))
            row = []
            outs = {}
            for variant, rows in ROWS.items():
                y = cp.zeros((batch, n), cp.float32)
                fn = mod.get_function(f"{variant}_{wt}")
                grid = (-(-n // rows),)
                with stream:
                    for i in range(3):
                        fn(grid, (256,), (ws[i % copies], x, y, np.int32(n), np.int32(k), np.int32(batch)))
                    stream.begin_capture()
                    for i in range(CALLS):
                        fn(grid, (256,), (ws[i % copies], x, y, np.int32(n), np.int32(k), np.int32(batch)))
                    g = stream.end_capture()
                    g.launch(stream)
                    s.record(stream)
                    for _ in range(REPS):
                        g.launch(stream)
                    e.record(stream)
                    e.synchronize()
                us = cp.cuda.get_elapsed_time(s, e) * 1e3 / (REPS * CALLS)
                outs[variant] = y.get()
                gbs = wbytes / us / 1e3
                row.append(f"{variant} {us:7.2f} µs {gbs:7.0f} GB/s {100 * gbs / bw:4.0f}%")
            agree = np.abs(outs["gemv"] - outs["gemvw"]).max() / max(np.abs(outs["gemv"]).max(), 1e-30)
            print(f"batch {batch:<3} {name:<9} {n:>5}x{k:<5} " + " | ".join(row) + f" | diff {agree:.1e}")
            del ws


# ---------------------------------------------------------------------------------------------------------
# fused GEMV kernels
# ---------------------------------------------------------------------------------------------------------


def fused_module(cp, options: tuple[str, ...] = ()):
    return load_module(read_kernel_source(ROOT / "kernels" / "llama_fused.cu"), "llama_fused", options)


def res_build(k: int) -> tuple[tuple[str, ...], int]:
    """gemv_res (O and down) as the fused spec builds and launches it: its compile options (a 3-slot ring) and
    its shared memory (the ring, 384 bytes a thread, and one x row of k floats)."""
    from dagbuild.load import load_spec

    opts = tuple(load_spec(ROOT / "specs" / "llama_decode_fused.yaml").kernels["gemv_res"].options)
    return opts, 384 * 256 + 4 * k


def gemv_shapes(dims: dict) -> dict[str, tuple[str, int, int]]:
    """kernel role -> (entry prefix, weight rows, k)."""
    hd = dims["head_dim"]
    return {
        "qkv": ("qkv_rope", (dims["heads"] + 2 * dims["kv_heads"]) * hd, dims["hidden"]),
        "o_proj": ("gemv_res", dims["hidden"], dims["heads"] * hd),
        "gate_up": ("gate_up_silu", 2 * dims["ffn"], dims["hidden"]),
        "down": ("gemv_res", dims["hidden"], dims["ffn"]),
        "lm_head": ("gemv_norm", dims["vocab"], dims["hidden"]),
    }


def random_weights(cp, shape, wt: str, rs):
    from dagbuild.llama.weights import convert

    x = rs.standard_normal(shape, dtype=cp.float32) * cp.float32(0.02)
    return cp.ascontiguousarray(convert(cp, x, "f32", wt))


RING = 106496  # the GEMVs' shared memory per 256-thread block (gemv_shared in the spec)


def gemv_grid(pairs: int, sms: int, per_sm: int | None) -> int:
    """Blocks of 8 warps for ``pairs`` row pairs: at most ``per_sm`` per SM with the pairs spread evenly over
    the warps (the spec's formula), or one pair per warp when ``per_sm`` is None."""
    if per_sm is None:
        return -(-pairs // 8)
    ppw = -(-pairs // (8 * sms * per_sm))
    return -(-pairs // (8 * ppw))


def fused_launches(cp, mod, role: str, entry: str, rows: int, k: int, dims: dict, wt: str, batch: int,
                   weights: list, rs, per_sm: int | None = 1, ring: int = RING,
                   engine: str = "", blocks: int | None = None, threads: int = 256) -> tuple[list, list, list]:
    """CALLS launches of one fused GEMV role, rotating over `weights`: (CuPy (fn, grid, block, args) tuples,
    dagbuild backend (func, grid, block, shared, args) tuples, the arrays they use). ``engine``: "" (the GEMV
    engine), "mma", "mv" or "mvc" (kernels/llama_batched.cu, ``blocks`` blocks)."""
    from dagbuild.llama.weights import convert

    i32, f32 = np.int32, np.float32
    fn = mod.get_function(f"{entry}_{engine}_{wt}" if engine else f"{entry}_{wt}")
    fn.max_dynamic_shared_size_bytes = max(ring, 1)
    func = int(fn.kernel.ptr)
    sms = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    pairs = (rows + 1) // 2
    grid = (blocks or gemv_grid(pairs, sms, per_sm),)
    keep = []

    def arr(shape, scale=1.0, offset=0.0, dtype=cp.float32):
        a = (rs.standard_normal(shape, dtype=cp.float32) * cp.float32(scale) + cp.float32(offset)).astype(dtype)
        keep.append(a)
        return a

    norm = convert(cp, arr((k,), 0.1, 1.0), "f32", wt)
    keep.append(norm)
    x = arr((batch, k))
    hd, max_seq = dims["head_dim"], 64
    if role == "qkv":
        q = arr((batch, dims["heads"] * hd))
        kc = convert(cp, arr((batch, dims["kv_heads"], max_seq, hd)), "f32", wt)  # the caches hold wt
        vc = convert(cp, arr((batch, dims["kv_heads"], max_seq, hd)), "f32", wt)
        keep += [kc, vc]
        pos = cp.full(batch, 10, cp.int32)
        keep.append(pos)
        bias = cp.zeros(rows, cp.float32)
        inv_freq = (1.0 / 10000.0 ** (cp.arange(0, hd, 2, dtype=cp.float32) / hd)).astype(cp.float32)
        keep += [bias, inv_freq]
        cargs = [(norm, x, q, kc, vc, pos, bias, inv_freq, i32(k), i32(dims["heads"]), i32(dims["kv_heads"]),
                  i32(hd), i32(max_seq), i32(batch), f32(1e-5))]
        kinds = ["ptr"] * 8 + ["i32"] * 6 + ["f32"]
    elif role == "gate_up":
        act = arr((batch, rows // 2))
        cargs = [(norm, x, act, i32(rows // 2), i32(k), i32(batch), f32(1e-5))]
        kinds = ["ptr"] * 3 + ["i32"] * 3 + ["f32"]
    elif role == "lm_head":
        y = arr((batch, rows))
        cargs = [(norm, x, y, i32(rows), i32(k), i32(batch), f32(1e-5))]
        kinds = ["ptr"] * 3 + ["i32"] * 3 + ["f32"]
    else:  # gemv_res: y += W x
        y = arr((batch, rows))
        cargs = [(x, y, i32(rows), i32(k), i32(batch))]
        kinds = ["ptr"] * 2 + ["i32"] * 3
    rest = cargs[0]
    cupy_calls, be_calls = [], []
    for i in range(CALLS):
        w = weights[i % len(weights)]
        args = (w, *rest)
        cupy_calls.append((fn, grid, (threads,), args, ring))
        vals = [("ptr", int(w.data.ptr))]
        for kind, v in zip(kinds, rest, strict=True):
            vals.append((kind, int(v.data.ptr) if kind == "ptr" else (float(v) if kind == "f32" else int(v))))
        be_calls.append((func, grid, (threads,), ring, vals))
    return cupy_calls, be_calls, keep


MMA_SHARED, MV_SHARED, MV_SHARED_MAX, CLUSTER = 185600, 115712, 232448, 8  # the spec's mma/mv launch dims
MVC_CLUSTER = 4  # the spec's mvc_cluster


def spread(units: int, slots: int) -> int:
    """How many of at most ``slots`` blocks (or clusters) take ``units`` tiles evenly: the spec's grids."""
    return -(-units // -(-units // slots))


def mv_fits(k: int, shared: int, threads: int = 256) -> bool:
    """The MV engine's smallest layout (8 batch rows, a two-stage ring) fits ``shared`` bytes at this k."""
    kp = -(-k // 32) * 32
    stride = 2 * kp + (64 if (2 * kp) % 128 == 0 else 0)
    return threads // 32 * 512 + 256 + 8 * stride + 2 * 64 * threads <= shared


def batched(cp, batches: list[int], bw: float, log: list) -> None:
    """The batch >= 2 engines side by side, PDL chains of CALLS calls from DRAM: the GEMV engine (spec launch),
    the MMA engine (clusters, spec launch) and the MV engine at two blocks per SM (mv_shared) and one (the
    maximum shared memory), and from 16 rows at one block on half the SMs and the MVC engine: every MV block
    stages all its batch rows of x from L2, so a call moves grid * batch * k * 4 bytes of x (69 MB for
    TinyLlama's QKV at 64 rows on 132 blocks, 6.6x its weights), which half the grid halves and the MVC engine's
    clusters of 4 divide by 4."""
    from dagbuild.backends import get_backend

    be = get_backend("auto")
    mod = load_module(read_kernel_source(ROOT / "kernels" / "llama_batched.cu"), "llama_batched",
                      (f"-DMMA_CLUSTER={CLUSTER}",))
    sms = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    l2 = cp.cuda.runtime.getDeviceProperties(0)["l2CacheSize"]
    stream = cp.cuda.Stream(non_blocking=True)
    rs = cp.random.RandomState(7)
    print(f"\n{'model':<13}{'kernel':<9}{'shape':>13} {'batch':>5} | PDL chain, µs per call (% of copy)", flush=True)
    for model, (dims, wt) in MODELS.items():
        for role, (entry, rows, k) in gemv_shapes(dims).items():
            wbytes = rows * k * 2
            copies = max(2, -(-3 * l2 // wbytes))
            weights = [random_weights(cp, (rows, k), wt, rs) for _ in range(copies)]
            pairs = (rows + 1) // 2
            tiles128, tiles16 = -(-pairs // 64), -(-pairs // 8)
            mma_blocks = CLUSTER * spread(tiles128, sms // CLUSTER)
            configs = {"gemv": ("", RING, gemv_grid(pairs, sms, 2), 256),
                       "mma": ("mma", MMA_SHARED, mma_blocks, 256)}
            for tag, shared, per_sm, threads in (("mv 2/SM", MV_SHARED, 2, 256), ("mv 1/SM", MV_SHARED_MAX, 1, 256),
                                                 ("mv 512t", MV_SHARED_MAX, 1, 512)):
                if mv_fits(k, shared, threads):
                    configs[tag] = ("mv", shared, spread(tiles16, per_sm * sms), threads)
            if "mv 1/SM" in configs:  # half the SMs: half the x rows staged from L2 (G * batch * k * 4 bytes a call)
                configs["mv ½SMs"] = ("mv", MV_SHARED_MAX, spread(tiles16, sms // 2), 256)
            # the MVC engine: K split over clusters of MVC_CLUSTER blocks (each stages k / MVC_CLUSTER of x)
            configs["mvc"] = ("mvc", MV_SHARED_MAX, MVC_CLUSTER * spread(tiles16, sms // MVC_CLUSTER), 256)
            for batch in batches:
                cells = []
                for tag, (engine, shared, blocks, threads) in configs.items():
                    if tag in ("mv ½SMs", "mvc") and batch < 16:
                        continue
                    _, be_calls, keep = fused_launches(cp, mod, role, entry, rows, k, dims, wt, batch, weights,
                                                       rs, ring=shared, engine=engine, blocks=blocks,
                                                       threads=threads)
                    with stream:
                        graph, ex = chain_graph(be, be_calls, True, stream.ptr)
                        us = time_graph(cp, lambda ex=ex: be.launch(ex, stream.ptr), stream) * 1e3 / CALLS
                        be.exec_destroy(ex)
                        be.graph_destroy(graph)
                    stream.synchronize()
                    gbs = wbytes / us / 1e3
                    cells.append(f"{tag} {us:7.2f} ({100 * gbs / bw:3.0f}%)")
                    log.append({"model": model, "wt": wt, "kernel": role, "engine": tag, "rows": rows, "k": k,
                                "batch": batch, "mode": "pdl", "us": us, "GBps": gbs, "of_copy": gbs / bw,
                                "grid": blocks, "shared": shared})
                    del keep, be_calls
                print(f"{model:<13}{role:<9}{rows:>6}x{k:<6} {batch:>5} | " + " | ".join(cells), flush=True)
            del weights
            cp.get_default_memory_pool().free_all_blocks()


def fused(cp, batches: list[int], bw: float, variants: bool, log: list) -> None:
    from dagbuild.backends import get_backend

    be = get_backend("auto")
    mod = fused_module(cp)
    res_mod = None  # gemv_res's own build (the spec's options)
    shapes = {"default": (2, RING)}  # variant: (blocks per SM at most, ring bytes)
    if variants:  # batch 1 and 8 only
        shapes |= {"<=1 block/SM": (1, RING), "ring only": (2, 65536), "no shared memory": (2, 0)}
    l2 = cp.cuda.runtime.getDeviceProperties(0)["l2CacheSize"]
    stream = cp.cuda.Stream(non_blocking=True)
    rs = cp.random.RandomState(5)
    print(f"\n{'model':<13}{'kernel':<9}{'shape':>13} {'batch':>5} | {'captured (plain)':>28} | "
          f"{'PDL chain':>28}", flush=True)
    for model, (dims, wt) in MODELS.items():
        for role, (entry, rows, k) in gemv_shapes(dims).items():
            wbytes = rows * k * 2
            copies = max(2, -(-3 * l2 // wbytes))
            weights = [random_weights(cp, (rows, k), wt, rs) for _ in range(copies)]
            role_mod = mod
            if entry == "gemv_res":  # the spec's build: a 3-slot ring, its shared memory the ring and one x row
                opts, res_ring = res_build(k)
                res_mod = res_mod or fused_module(cp, opts)
                role_mod = res_mod
            for variant, (per_sm, ring) in shapes.items():
                if entry == "gemv_res":  # the same variants over its 96 KiB ring (the others' is 64 KiB)
                    ring = {RING: res_ring, 65536: 384 * 256}.get(ring, ring)
                for batch in batches if variant == "default" else (1, 8):
                    cupy_calls, be_calls, keep = fused_launches(cp, role_mod, role, entry, rows, k, dims, wt, batch,
                                                                weights, rs, per_sm, ring)
                    res = {}
                    with stream:
                        for fn, grid, block, args, sh in cupy_calls[:3]:
                            fn(grid, block, args, shared_mem=sh)
                        stream.begin_capture()
                        for fn, grid, block, args, sh in cupy_calls:
                            fn(grid, block, args, shared_mem=sh)
                        g = stream.end_capture()
                        res["captured"] = time_graph(cp, lambda g=g: g.launch(stream), stream) * 1e3 / CALLS
                        graph, ex = chain_graph(be, be_calls, True, stream.ptr)
                        res["pdl"] = time_graph(cp, lambda ex=ex: be.launch(ex, stream.ptr), stream) * 1e3 / CALLS
                        be.exec_destroy(ex)
                        be.graph_destroy(graph)
                    stream.synchronize()
                    cells = []
                    for mode in ("captured", "pdl"):
                        us = res[mode]
                        gbs = wbytes / us / 1e3
                        cells.append(f"{us:8.2f} µs {gbs:6.0f} GB/s {100 * gbs / bw:4.0f}%")
                        log.append({"model": model, "wt": wt, "kernel": role, "entry": f"{entry}_{wt}",
                                    "rows": rows, "k": k, "batch": batch, "mode": mode, "variant": variant,
                                    "us": us, "GBps": gbs, "of_copy": gbs / bw,
                                    "grid": cupy_calls[0][1][0]})
                    tag = f" grid {cupy_calls[0][1][0]}" + ("" if variant == "default" else f" [{variant}]")
                    print(f"{model:<13}{role:<9}{rows:>6}x{k:<6} {batch:>5} | " + " | ".join(cells) + tag,
                          flush=True)
                    del keep, cupy_calls, be_calls
            del weights
            cp.get_default_memory_pool().free_all_blocks()


# ---------------------------------------------------------------------------------------------------------
# chain of fused layers, and whole steps
# ---------------------------------------------------------------------------------------------------------

LAYER_KINDS = ("qkv", "attn", "o_proj", "gate_up", "down_proj")


def chain_graph(backend, launches, programmatic: bool, stream_ptr: int):
    """An instantiated, uploaded graph of ``launches`` ((func, grid, block, shared, args) as the backend takes
    them) in one chain, every edge programmatic or plain. Returns (graph, exec); destroy both when done."""
    graph = backend.graph_create()
    prev = None
    for launch in launches:
        node = backend.add_kernel(graph, [prev] if prev is not None and not programmatic else [], *launch)
        if prev is not None and programmatic:
            backend.add_dependency(graph, prev, node, "programmatic")
        prev = node
    exec_ = backend.instantiate(graph)
    backend.upload(exec_, stream_ptr)
    return graph, exec_


def chain(cp, bw: float, positions: list[int], log: list, chunks: list[int] | None = None) -> None:
    from dagbuild.backends import get_backend
    from dagbuild.bench import capture, device_us_per_launch
    from dagbuild.data import shipped_spec
    from dagbuild.executable import ExecOptions, Executable
    from dagbuild.kernels import ModuleCache
    from dagbuild.llama.decode import llama_plan
    from dagbuild.llama.weights import random_weights as fill_weights
    from dagbuild.llama.weights import weight_buffer_names

    fused_spec = ROOT / "specs" / "llama_decode_fused.yaml"
    modules = ModuleCache()

    def ready(exe, pos: int, fill: bool = True) -> None:
        """Random weights (seed 0) unless ``fill`` is False, token 1 at position ``pos``, one launch: the KV
        cache then holds that position, and the timed launches that follow repeat it."""
        if fill:
            fill_weights(exe, 0)
        exe.buffers["tokens_host"][:] = 1
        exe.buffers["pos_host"][:] = pos
        exe.launch(sync=True)

    for model, (dims, wt) in MODELS.items():
        over = {**dims, "wt": wt, "batch": 1, "max_seq": 512}
        plan = llama_plan(over, fused_spec)
        wbytes = sum(plan.buffers[b].nbytes for b in weight_buffer_names(plan) if b != "embed_tokens") + \
            dims["hidden"] * 2
        layer_bytes = sum(plan.buffers[b].nbytes for b in ("wqkv", "wo", "w_gate_up", "w_down"))
        floor_ms = wbytes / (bw * 1e9) * 1e3
        pos = positions[0]
        print(f"\n== {model} ({wt}, batch 1, position {pos}): weights per token {wbytes / 1e9:.3f} GB -> floor "
              f"{floor_ms:.4f} ms; the layers' {layer_bytes / 1e9:.3f} GB -> {layer_bytes / bw / 1e6:.4f} ms ==",
              flush=True)
        be = get_backend("auto")
        rows = {}
        with Executable(plan, backend=be, modules=modules) as exe:  # programmatic edges where the spec says
            ready(exe, pos)
            stream = exe.stream
            # the layers alone
            order = [n for n in plan.topological() if n.id.split(".")[0] in LAYER_KINDS]
            ids = {n.id for n in order}
            steps = [f for n, f in zip(plan.topological(), exe.eager_steps(), strict=True) if n.id in ids]
            launches = [exe.node_params(n.id) for n in order]
            g = capture(stream, steps)
            rows["layers, CuPy-captured (plain)"] = time_graph(cp, lambda g=g, s=stream: g.launch(s), stream, 20)
            for programmatic in (False, True):
                graph, ex = chain_graph(be, launches, programmatic, stream.ptr)
                name = f"layers, explicit {'PDL' if programmatic else 'plain'} edges"
                rows[name] = time_graph(cp, lambda ex=ex, be=be, s=stream: be.launch(ex, s.ptr), stream, 20)
                be.exec_destroy(ex)
                be.graph_destroy(graph)
            # the whole step (upload, embed, layers, LM head, argmax, download)
            rows["whole step, fused, PDL (device, back to back)"] = device_us_per_launch(exe, 50) / 1e3
            rows["whole step, fused, PDL (host: launch + wait)"] = host_ms(exe)
            logits_pdl = exe.buffers["logits"].get()
            for other in positions[1:]:  # longer contexts: more attention splits (and the combine)
                ready(exe, other, fill=False)
                graph, ex = chain_graph(be, launches, True, stream.ptr)
                rows[f"layers, explicit PDL edges, position {other}"] = time_graph(
                    cp, lambda ex=ex, be=be, s=stream: be.launch(ex, s.ptr), stream, 20)
                be.exec_destroy(ex)
                be.graph_destroy(graph)
                rows[f"whole step, fused, PDL (device), position {other}"] = device_us_per_launch(exe, 50) / 1e3
        for chunk in chunks or []:  # other attention split sizes
            with Executable(llama_plan({**over, "attn_chunk": chunk}, fused_spec), modules=modules) as exe:
                for k, p in enumerate(positions):
                    ready(exe, p, fill=k == 0)
                    rows[f"whole step, fused, PDL (device), attn_chunk {chunk}, position {p}"] = \
                        device_us_per_launch(exe, 50) / 1e3
        with Executable(plan, ExecOptions(programmatic=False), modules=modules) as exe:
            ready(exe, pos)
            rows["whole step, fused, plain edges (device)"] = device_us_per_launch(exe, 50) / 1e3
            rows["whole step, fused, plain edges (host)"] = host_ms(exe)
            logits_plain = exe.buffers["logits"].get()
        with Executable(llama_plan(over, shipped_spec("llama_decode.yaml")), modules=modules) as exe:
            ready(exe, pos)
            rows["whole step, unfused spec (device)"] = device_us_per_launch(exe, 50) / 1e3
            rows["whole step, unfused spec (host)"] = host_ms(exe)
            logits_unfused = exe.buffers["logits"].get()
        agree = float(np.linalg.norm(logits_pdl - logits_unfused) / np.linalg.norm(logits_unfused))
        agree2 = float(np.linalg.norm(logits_plain - logits_unfused) / np.linalg.norm(logits_unfused))
        print(f"{'':4}{'what':<52} {'ms':>8} {'x floor':>8}")
        for name, ms in rows.items():
            ref_floor = layer_bytes / bw / 1e6 if name.startswith("layers") else floor_ms
            print(f"{'':4}{name:<52} {ms:8.4f} {ms / ref_floor:8.2f}", flush=True)
            log.append({"model": model, "what": name, "ms": ms, "floor_ms": ref_floor})
        print(f"    logits after the same steps: fused PDL vs unfused rel. diff {agree:.2e}, fused plain vs "
              f"unfused {agree2:.2e}", flush=True)
        log.append({"model": model, "logits_rel_diff_pdl": agree, "logits_rel_diff_plain": agree2})
        cp.get_default_memory_pool().free_all_blocks()


def host_ms(exe, steps: int = 100) -> float:
    for _ in range(5):
        exe.launch(sync=True)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        exe.launch(sync=True)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--legacy", action="store_true", help="the kernels/llama.cu GEMVs (the default)")
    ap.add_argument("--fused", action="store_true", help="the kernels/llama_fused.cu GEMVs")
    ap.add_argument("--variants", action="store_true", help="with --fused: other launch shapes (batch 1 and 8)")
    ap.add_argument("--chain", action="store_true", help="the fused layers back to back, and whole steps")
    ap.add_argument("--batched", action="store_true", help="GEMV vs MMA vs MV engines at batches >= 2")
    ap.add_argument("--wt", default="f16", help="weight type of --legacy")
    ap.add_argument("--batches", default=None, help="batch sizes (legacy 1,4,8; fused 1,2,4,8,16,64)")
    ap.add_argument("--pos", default="100,400", help="decode positions of --chain (default 100,400; the first "
                    "for every figure, the others for the PDL ones)")
    ap.add_argument("--chunks", default="", help="with --chain: also these attn_chunk values (e.g. 64,128)")
    ap.add_argument("--json", help="write every figure to this file")
    args = ap.parse_args()
    import cupy as cp

    if not (args.legacy or args.fused or args.chain or args.batched):
        args.legacy = True
    dev = cp.cuda.runtime.getDeviceProperties(0)
    bw = copy_bandwidth()["GBps"]
    print(f"{dev['name'].decode()}: {dev['multiProcessorCount']} SMs, L2 {dev['l2CacheSize'] >> 20} MiB; "
          f"device-to-device copy {bw:.0f} GB/s (read + write). µs per call, GB/s of weights, % of copy.",
          flush=True)
    log: list = []
    if args.legacy:
        legacy(cp, args.wt, [int(b) for b in (args.batches or "1,4,8").split(",")], bw)
    if args.chain:
        chain(cp, bw, [int(p) for p in args.pos.split(",")], log, [int(c) for c in args.chunks.split(",") if c])
    if args.fused:
        fused(cp, [int(b) for b in (args.batches or "1,2,4,8,16,64").split(",")], bw, args.variants, log)
    if args.batched:
        batched(cp, [int(b) for b in (args.batches or "1,2,4,8,16,32,64,128,256").split(",")], bw, log)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev["name"].decode(), "copy_GBps": bw, "rows": log},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
