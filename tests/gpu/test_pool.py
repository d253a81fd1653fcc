"""GraphPool on a GPU: a mix of batch sizes decodes each sequence exactly as batch 1 does, bucket
switches need no instantiation, padding rows corrupt nothing, and close() frees everything."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import yaml
from conftest import SPECS, CountingBackend

from dagbuild import BuildError, load_spec
from dagbuild.executable import Executable
from dagbuild.llama.decode import LlamaDecoder, llama_plan
from dagbuild.pool import GraphPool

pytestmark = pytest.mark.gpu

TINY = {**yaml.safe_load((SPECS / "configs" / "llama_tiny.yaml").read_text()), "wt": "f32", "max_seq": 64}
SEED = 7


def _single_reference(prompt: list[int], steps: int) -> list[int]:
    """Tokens from feeding ``prompt`` then greedy continuation, one row, batch 1, ``steps`` launches."""
    from dagbuild.llama.weights import random_weights

    with Executable(llama_plan({**TINY, "batch": 1})) as exe:
        random_weights(exe, SEED)
        dec = LlamaDecoder(exe)
        dec.reset()
        out, tok = [], prompt[0]
        for t in range(steps):
            nxt = int(dec.step([tok], [t])[0])
            tok = prompt[t + 1] if t + 1 < len(prompt) else nxt
            if t + 1 >= len(prompt):
                out.append(nxt)
        return out


@pytest.mark.parametrize("method", ["derive", "fresh"])
def test_mixed_batches_match_batch_one(method):
    from dagbuild.backends import get_backend
    from dagbuild.llama.weights import random_weights

    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(0, TINY["vocab"], size=3))) for _ in range(5)]
    be = CountingBackend(get_backend("cuda"))
    spec = load_spec(SPECS / "llama_decode.yaml")
    with GraphPool(spec, {"batch": [1, 2, 4, 8]}, overrides={**TINY, "cache_batch": 8}, method=method,
                   backend=be) as pool:
        built = be.instantiations
        assert built == 4 and len(pool.executables) == 4
        random_weights(pool.get(batch=8), SEED)
        LlamaDecoder(pool.get(batch=8)).reset()
        # schedule of active rows per step: sequences keep their rows; paused rows get position -1
        schedule = [[0, 1, 2, 3, 4]] * 4 + [[0, 1]] * 3 + [[0, 2]] * 2 + [[0]] * 2 + [[0, 1, 2, 3, 4]] * 3
        steps_done = [0] * 5
        current = [p[0] for p in prompts]
        produced: list[list[int]] = [[] for _ in prompts]
        for active in schedule:
            rows = max(active) + 1
            dec = LlamaDecoder(pool.get(batch=rows))
            toks = [current[r] if r in active else 0 for r in range(rows)]
            pos = [steps_done[r] if r in active else -1 for r in range(rows)]
            nxt = dec.step(toks, pos)
            for r in active:
                t = steps_done[r]
                steps_done[r] += 1
                if t + 1 < len(prompts[r]):
                    current[r] = prompts[r][t + 1]
                else:
                    produced[r].append(int(nxt[r]))
                    current[r] = int(nxt[r])
        assert be.instantiations == built, "switching buckets must not instantiate anything"
        # the build's host time by phase: the derived buckets set parameters, the fresh ones add nodes
        want = {"bind", "compile", "allocate", "instantiate"} | ({"set"} if method == "derive" else set())
        assert want | {"kernel nodes", "memcpy nodes"} <= set(pool.phases) and min(pool.phases.values()) >= 0
        assert sum(v for k, v in pool.phases.items() if k != "bind") <= sum(pool.build_ms.values()) / 1e3
        # rows 5..7 of the cache were only ever padding: never written
        k = pool.arena["k_cache"]
        assert float(abs(k[:, 5:]).max()) == 0.0
    for r, p in enumerate(prompts):
        assert produced[r] == _single_reference(p, steps_done[r]), f"sequence {r} diverged from batch 1"


def test_lazy_pool_errors_and_close_frees_memory():
    import cupy

    gc.collect()
    pool_mem = cupy.get_default_memory_pool()
    before = pool_mem.used_bytes()
    spec = load_spec(SPECS / "llama_decode.yaml")
    pool = GraphPool(spec, {"batch": [1, 4]}, overrides={**TINY, "cache_batch": 4}, eager=False)
    assert pool.executables == {}
    assert pool.get(batch=3) is pool.executables[(4,)]
    assert pool.get(batch=1) is pool.executables[(1,)]
    assert pool.get(batch=1).buffers["x"].data.ptr == pool.get(batch=4).buffers["x"].data.ptr
    assert set(pool.activations()) >= {"x", "h", "tokens_host", "logits"}
    assert "k_cache" not in pool.activations() and "wq" not in pool.activations()
    with pytest.raises(BuildError, match="above the largest bucket"):
        pool.get(batch=5)
    with pytest.raises(BuildError, match="not bucketed"):
        pool.get(layers=2)
    pool.close()
    with pytest.raises(BuildError, match="closed"):
        pool.get(batch=1)
    gc.collect()
    assert pool_mem.used_bytes() == before


def test_decoder_step_rejects_bad_inputs():
    from dagbuild import DagbuildError

    with Executable(llama_plan({**TINY, "batch": 2})) as exe:
        dec = LlamaDecoder(exe)
        with pytest.raises(DagbuildError, match=r"token ids must be in \[0, 1024\)"):
            dec.step([1024], [0])
        with pytest.raises(DagbuildError, match="past max_seq = 64"):
            dec.step([1], [64])
        with pytest.raises(DagbuildError, match="do not fit this graph's batch of 2"):
            dec.step([1, 2, 3], [0, 0, 0])
        with pytest.raises(DagbuildError, match="2 tokens but 1 positions"):
            dec.step([1, 2], [0])
        assert dec.step([5], [0]).shape == (1,)  # still usable


def test_cross_product_buckets_with_different_topologies():
    """Two bucketed dims give every combination; `steps` changes the node count, so those buckets get
    their own DAG (not the largest bucket's), and each computes its own result."""
    spec = load_spec(SPECS / "chain.yaml")
    with GraphPool(spec, {"n": [256, 512], "steps": [2, 5]}) as pool:
        assert set(pool.executables) == {(256, 2), (256, 5), (512, 2), (512, 5)}
        assert pool.bucket_for(n=300, steps=3) == (512, 5)
        for (n, steps), exe in pool.executables.items():
            assert len(exe.plan.nodes) == steps + 3
            x = np.linspace(-1, 1, n, dtype=np.float32)
            exe.buffers["x_host"][...] = x
            exe.launch(sync=True)
            assert np.allclose(exe.buffers["y_host"], 0.5 * steps * x), (n, steps)
