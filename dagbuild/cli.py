"""The ``dagbuild`` command: validate, dot, info, schema, compile, run, bench, pool.

Exit codes: 0 success, 1 an invalid spec (or a failed check), 2 a usage error (missing file, bad flag or
argument). Every argument is checked before anything needs a GPU, so a bad command line fails the same way
on every machine. Each subcommand is a thin layer over the library; no logic of its own lives here.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

from .errors import DagbuildError, Issue, SpecError

#: ``runner:`` values of a spec and the function (``module:attr``, called as ``fn(plan, args)``) that
#: ``dagbuild run`` hands the plan to on a GPU. A spec without ``runner`` gets the generic launch loop.
RUNNERS = {"llama_decode": "dagbuild.llama.run:run_cli"}

#: ``dagbuild dot -o FILE`` without ``--format``: the format from the file's suffix.
FORMAT_BY_SUFFIX = {".dot": "dot", ".gv": "dot", ".svg": "svg", ".png": "png"}

#: A decimal float as ``--set`` takes one for a const (``1e-6``, ``0.125``); anything else stays a string.
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z")


class UsageError(Exception):
    pass


# ---- argument checks (no GPU, no spec needed) -------------------------------------------------------------


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{what} must be ≥ {low}, got {value}")
        return value

    return parse


def _overrides(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--set expects NAME=VALUE, got {pair!r}")
        value = value.strip()
        try:
            out[name.strip()] = int(value)
        except ValueError:
            out[name.strip()] = float(value) if _FLOAT.match(value) else value  # a const: --set rms_eps=1e-6
    return out


def overrides_of(args) -> dict[str, Any]:
    """``--config FILE`` (a YAML mapping of dims/types) then ``--set NAME=VALUE`` on top."""
    from .load import parse_yaml, read_text

    out: dict[str, Any] = {}
    for path in getattr(args, "config", None) or []:
        try:
            data = parse_yaml(read_text(path, "--config"), source=f"--config {path}")
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        except SpecError as e:
            raise UsageError(f"--config {path} is not valid YAML: {'; '.join(i.message for i in e.issues)}") from None
        if not isinstance(data, dict):
            raise UsageError(f"--config {path} must be a mapping of dim/type names to values")
        out.update(data)
    return out | _overrides(getattr(args, "set", None))


def _buckets(items: list[str]) -> dict[str, list[int]]:
    """``--buckets DIM=1,2,4`` (repeatable) → {dim: sorted values}; every value an integer ≥ 1."""
    out: dict[str, list[int]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--buckets expects DIM=1,2,4,..., got {item!r}")
        if name in out:
            raise UsageError(f"--buckets: {name!r} is given twice")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not parts:
            raise UsageError(f"--buckets {item!r}: give at least one value, e.g. {name}=1,2,4")
        try:
            ints = {int(v) for v in parts}
        except ValueError:
            raise UsageError(f"--buckets {item!r}: values must be integers ≥ 1") from None
        if min(ints) < 1:
            raise UsageError(f"--buckets {item!r}: values must be integers ≥ 1, got {min(ints)}")
        out[name] = sorted(ints)
    return out


def _check_prompt_ids(text: str) -> None:
    parts = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [t for t in parts if not t.isdigit()]
    if not parts or bad:
        raise UsageError(f"--prompt-ids must be comma-separated token ids (integers ≥ 0), got {text!r}")


def _check_weights(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        missing = [what for what, ok in (("config.json", (p / "config.json").is_file()),
                                         ("*.safetensors files", any(p.glob("*.safetensors")))) if not ok]
        if missing:
            raise UsageError(f"--weights {path}: not an HF checkpoint directory (it has no {' and no '.join(missing)})")
    elif p.is_file():
        if p.suffix != ".safetensors":
            raise UsageError(f"--weights {path}: expected a checkpoint directory or a .safetensors file")
    else:
        raise UsageError(f"--weights {path}: no such directory")


def _float_in(low: float, high: float, what: str, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be in {'(' if low_open else '['}{low}, {high}], got {text}")
        return value

    return parse


def _looping(args) -> bool:
    """Whether ``run`` decodes through the loop (K tokens per launch, sampling on the device)."""
    return args.tokens_per_launch is not None or args.temperature > 0 or args.eos >= 0


def _check_run_args(args) -> None:
    if args.prompt is not None and args.prompt_ids is not None:
        raise UsageError("give --prompt TEXT or --prompt-ids 1,2,3, not both")
    if args.prompt_ids is not None:
        _check_prompt_ids(args.prompt_ids)
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.chat and args.prompt is None:
        raise UsageError("--chat applies the checkpoint's chat template to --prompt TEXT: give --prompt")
    if args.weights is not None:
        _check_weights(args.weights)
        if args.random_weights is not None:
            raise UsageError("give --weights DIR or --random-weights SEED, not both")
    if args.prompt is not None:
        from .llama.weights import checkpoint_folder

        if not args.weights or not (checkpoint_folder(args.weights) / "tokenizer.json").is_file():
            raise UsageError("--prompt TEXT is tokenized with the checkpoint's tokenizer.json: give --weights DIR "
                             "of a checkpoint that has one, or token ids with --prompt-ids 1,2,3")
        if importlib.util.find_spec("tokenizers") is None:
            from .llama.text import MISSING

            raise UsageError(MISSING)


def _hf_model(path: str | None):
    """The HF config (``config.json`` or its directory, or a checkpoint's .safetensors file's folder) as a
    :class:`dagbuild.llama.config.ModelConfig`; None without a path. A refusal is a DagbuildError (exit 1)."""
    if path is None:
        return None
    from .llama.config import read_hf_config

    p = Path(path)
    return read_hf_config(p.parent if p.suffix == ".safetensors" else p)


def _target(args) -> tuple[str, str]:
    """(backend, arch) of ``dagbuild compile``: ``--target cuda:sm_90`` / ``hip:gfx90a``, or ``--arch``."""
    if args.target is None:
        backend, arch = "cuda", args.arch or "sm_90"
    else:
        backend, sep, arch = args.target.partition(":")
        if not sep or backend not in ("cuda", "hip") or not arch:
            raise UsageError(f"--target expects cuda:ARCH (e.g. cuda:sm_90) or hip:ARCH (e.g. hip:gfx90a), "
                             f"got {args.target!r}")
        if args.arch is not None and (backend != "cuda" or args.arch != arch):
            raise UsageError(f"--arch {args.arch} contradicts --target {args.target}; give one of them")
    if backend == "hip":
        from .hiprtc import ARCH_NAME

        if not ARCH_NAME.match(arch):
            raise UsageError(f"bad HIP architecture {arch!r}: expected e.g. gfx90a, gfx942 or gfx1100")
        return backend, arch
    from .kernels import check_arch

    try:
        check_arch(arch)
    except DagbuildError as e:
        raise UsageError(str(e)) from None
    return backend, arch


# ---- shared steps -----------------------------------------------------------------------------------------


def _load(path: str):
    from .load import load_spec

    if not Path(path).is_file():
        raise UsageError(f"spec file not found: {path}")
    return load_spec(path)


def _plan(args, model=None, device: bool = False):
    """The spec's plan: an HF model's dims, wt and consts (``model``), then the GPU's (``device``: see
    :func:`_device_dims`), then --config, then --set on top."""
    from .plan import plan

    spec = _load(args.spec)
    return plan(spec, {**(model.overrides() if model is not None else {}), **(_device_dims(spec) if device else {}),
                       **overrides_of(args)})


def _device_dims(spec) -> dict:
    """Dims the spec declares that describe the GPU this command runs on: ``sms`` (the SM count the fused
    kernels' grids are sized for; the spec's default is an H100/H200's 132). Empty without a GPU."""
    if "sms" not in spec.dims or _gpu_problem() is not None:
        return {}
    import cupy

    return {"sms": int(cupy.cuda.Device().attributes["MultiProcessorCount"])}


def _model_plan(args, path: str | None, where: str, device: bool = False):
    """(the HF model at ``path``, or None; the spec's plan for it, checked against it: ``where`` names the
    config in a refusal)."""
    model = _hf_model(path)
    p = _plan(args, model, device)
    if model is not None:
        from .llama.config import check_plan

        check_plan(model, p.dims, p.consts, where=where)
    return model, p


def _gpu_problem() -> str | None:
    from . import backends

    return backends.gpu_problem()


def _print_issues(err: SpecError, spec_path: str) -> None:
    print(f"{spec_path}: invalid spec, {len(err.issues)} error(s):", file=sys.stderr)
    for i in err.issues:
        where = f"{spec_path}:{i.line}: " if i.line else f"{spec_path}: "
        print(f"  {where}[{i.code}] {i.message}", file=sys.stderr)


def _write(path: Path, data: bytes, what: str) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:
        raise UsageError(f"cannot write {what} {str(path)!r}: {e.strerror or e}") from None


# ---- commands ---------------------------------------------------------------------------------------------


def cmd_validate(args) -> int:
    try:
        p = _plan(args)
    except (UsageError, FileNotFoundError) as e:
        if not args.json:
            raise
        print(json.dumps({"ok": False, "errors": [Issue("usage", str(e)).to_json()], "summary": {}}, indent=2))
        return 2
    except SpecError as e:
        if args.json:
            print(json.dumps({"ok": False, "errors": [i.to_json() for i in e.issues], "summary": {}}, indent=2))
        else:
            _print_issues(e, args.spec)
        return 1
    if args.json:
        print(json.dumps({"ok": True, "errors": [], "summary": p.summary}, indent=2))
    else:
        s = p.summary
        print(f"{args.spec}: valid — {s['nodes']} nodes, {s['edges_reduced']} edges after reduction "
              f"({s['edges']} before), critical path {s['critical_path']}, max width {s['max_width']}")
    return 0


def cmd_dot(args) -> int:
    from .dot import render, to_dot

    fmt = args.format
    if fmt is None:
        fmt = FORMAT_BY_SUFFIX.get(Path(args.output).suffix.lower(), "dot") if args.output else "dot"
    if fmt == "png" and not args.output:
        raise UsageError("PNG is binary: give -o FILE.png (dot and svg may go to stdout)")
    p = _plan(args)
    text = to_dot(p)
    data = text.encode() if fmt == "dot" else render(text, fmt)
    if args.output:
        _write(Path(args.output), data, "the graph to")
        print(f"wrote {args.output} ({fmt}, {len(p.nodes)} nodes, {len(p.edges)} edges)", file=sys.stderr)
    else:
        sys.stdout.write(data.decode())
    return 0


def format_summary(s: dict) -> str:
    from .util import format_bytes as size

    rows = [("spec", s["name"]), ("nodes", str(s["nodes"]))]
    rows += [(f"  {k}", str(v)) for k, v in s["nodes_by_kind"].items()]
    width = str(s["max_width"]) + ("" if s.get("max_width_exact", True) else " (at least: a large graph)")
    rows += [("edges (inferred + after)", str(s["edges"])), ("edges after reduction", str(s["edges_reduced"])),
             ("  programmatic (kernel → kernel)", str(s.get("edges_programmatic", 0))),
             ("critical path (nodes)", str(s["critical_path"])), ("max width (nodes at once)", width),
             ("buffers", str(s["buffers"]))]
    rows += [(f"  {k} memory", size(v)) for k, v in s["bytes_by_memory"].items()]
    rows += [("dims", ", ".join(f"{k}={v}" for k, v in s["dims"].items()) or "-")]
    if s.get("consts"):
        rows += [("consts", ", ".join(f"{k}={v:g}" for k, v in s["consts"].items()))]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def cmd_info(args) -> int:
    model, p = _model_plan(args, args.hf_config, str(args.hf_config))
    print(format_summary(p.summary))
    if model is not None:
        from .llama.footprint import footprint
        from .util import format_bytes

        fp = footprint(p, tied=model.tied)
        rope = model.rope.rope_type + (f" {dict(model.rope.params)}" if model.rope.params else "")
        print(f"\nHF model: {model.architecture} (model_type {model.model_type}), wt {model.wt}, rms_eps "
              f"{model.rms_eps:g}, rope {rope} theta {model.rope.theta:g}, attn_scale {model.attn_scale:.6g}"
              + (", Q/K/V biases" if model.qkv_bias else "") + (", tied embeddings" if model.tied else ""))
        print(f"weight bytes:   {format_bytes(fp.weights)} ({fp.weights} B)")
        print(f"KV-cache bytes: {format_bytes(fp.kv_cache)} ({fp.kv_cache} B) at max_seq {p.dims['max_seq']} "
              f"x cache_batch {p.dims['cache_batch']}")
        print(f"activations:    {format_bytes(fp.activations)}; total {format_bytes(fp.total)}")
    return 0


def cmd_schema(args) -> int:
    from .spec import GraphSpec

    schema = GraphSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dagbuild spec (format 1)"
    print(json.dumps(schema, indent=2))
    return 0


def _check_plan_for(backend: str):
    if backend == "hip":
        from .hiprtc import check_plan_hip

        return check_plan_hip
    from .kernels import check_plan

    return check_plan


def cmd_compile(args) -> int:
    backend, arch = _target(args)
    p = _plan(args)
    report = _check_plan_for(backend)(p, arch)
    for name, info in report.items():
        parts = [f"{info['params']} params"] if "params" in info else []
        parts += [f"{v} bytes of {k.removesuffix('_bytes').upper()}" for k, v in info.items() if k.endswith("_bytes")]
        print(f"{name}: {info.get('entry', name)} ok ({', '.join([*parts, f'{backend}:{arch}'])})")
    return 0


def cmd_occupancy(args) -> int:
    from .occupancy import SM_LIMITS, format_occupancy, kernel_resources, plan_occupancy

    p = _plan(args)
    sms = args.sms if args.sms is not None else int(p.dims.get("sms", 132))
    if sms < 1:
        raise UsageError(f"the SM count must be positive, got {sms} (the spec's sms dim, or --sms)")
    rows = plan_occupancy(p, kernel_resources(p, args.arch), sms, SM_LIMITS[args.arch])
    print(format_occupancy(rows, sms, len(p.nodes) - len(rows)))
    return 0


def _runner(p) -> str | None:
    """The spec's ``runner`` (None: the generic launch loop); an unknown one is an invalid spec."""
    runner = p.spec.runner
    if runner is not None and runner not in RUNNERS:
        raise SpecError(Issue("schema", f"runner: unknown runner {runner!r}; known runners: "
                              f"{', '.join(sorted(RUNNERS))} (leave `runner` out for the generic launch loop)",
                              field="runner", line=p.spec.line_of(("runner",))))
    return runner


def _dot_path(args, name: str) -> Path:
    """Where ``run`` without a GPU writes the DOT: ``--dot PATH``, else ``NAME.dot`` in the current directory
    (never elsewhere: a name with a path in it, or a link that leads out, is refused)."""
    if args.dot:
        return Path(args.dot)
    from .spec import SPEC_NAME

    path = Path(f"{name}.dot")  # names follow the spec format's rule; a link could still lead out
    if not SPEC_NAME.match(name) or path.resolve().parent != Path.cwd().resolve():
        raise UsageError(f"the spec name {name!r} does not make a file name in the current directory; "
                         "give --dot PATH")
    return path


def cmd_run(args) -> int:
    from .dot import to_dot

    _check_run_args(args)
    _, p = _model_plan(args, args.weights, f"checkpoint {args.weights!r}", device=True)
    runner = _runner(p)
    looping = runner == "llama_decode" and _looping(args)
    if looping:
        from .llama.loop import looped_plan

        p = looped_plan(p, args.tokens_per_launch or 1)
    problem = _gpu_problem()
    if problem is not None:
        dot_path = _dot_path(args, p.name)
        _write(dot_path, to_dot(p).encode(), "the DOT file")
        print(format_summary(p.summary))
        print(f"\nvalid; wrote the reduced DAG to {dot_path} (render: dot -Tsvg {dot_path} -o {dot_path.stem}.svg)")
        print(f"\nNo GPU here: {problem}.")
        if looping:
            print(f"On a GPU (pip install 'dagbuild[cuda13]'), this command builds the graph above: the decode step "
                  f"in a loop node (a CUDA WHILE conditional node) of up to {p.dims['steps']} steps per launch, "
                  "with sampling, token feedback and stopping on the device; it loads weights, runs the prompt "
                  "and decodes --tokens N tokens per row, printing them with ms/step.")
        elif runner == "llama_decode":
            print("On a GPU (pip install 'dagbuild[cuda13]'), this command builds the whole decode step above "
                  "as ONE explicit CUDA graph, loads weights (--weights DIR, an HF Llama/Mistral/Qwen2 checkpoint, "
                  "or --random-weights SEED), runs the prompt (--prompt TEXT or --prompt-ids) through prefill graphs "
                  "pooled by prompt length (fused spec; else through the decode graph one position at a time), then "
                  "decodes --tokens N tokens greedily, one graph launch per token, streaming the text (or printing "
                  "the ids) with ms/token.")
        else:
            print("On a GPU (pip install 'dagbuild[cuda13]'), this command builds the graph above explicitly "
                  "(no stream capture), launches it --steps times and prints the time per launch.")
        return 0
    if runner is not None:
        module, _, attr = RUNNERS[runner].partition(":")
        return getattr(importlib.import_module(module), attr)(p, args)
    from .bench import run_steps

    result = run_steps(p, steps=args.steps)
    print(f"{p.name}: built {len(p.nodes)} nodes in {result['build_ms']:.2f} ms; {args.steps} launches, "
          f"median {result['median_us']:.1f} µs, p99 {result['p99_us']:.1f} µs per launch")
    return 0


def cmd_bench(args) -> int:
    from .bench import bench, format_bench

    p = _plan(args)
    problem = _gpu_problem()
    if problem is not None:
        print(f"dagbuild bench needs a GPU: {problem}.", file=sys.stderr)
        return 2
    result = bench(p, steps=args.steps, warmup=args.warmup)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def cmd_pool(args) -> int:
    """Build every bucket; print build time per bucket and in total, and memory."""
    import time

    from .plan import plan

    buckets = _buckets(args.buckets)
    spec = _load(args.spec)
    for dim in buckets:
        if dim not in spec.dims:
            raise UsageError(f"--buckets {dim}: {dim!r} is not a dim of spec {spec.name!r} "
                             f"(dims: {', '.join(spec.dims) or 'none'})")
    overrides = overrides_of(args)
    plan(spec, {**overrides, **{d: vs[-1] for d, vs in buckets.items()}})  # the spec is valid at the top bucket
    problem = _gpu_problem()
    if problem is not None:
        print(f"dagbuild pool needs a GPU: {problem}.", file=sys.stderr)
        return 2
    import cupy

    from .pool import GraphPool

    free0, _ = cupy.cuda.runtime.memGetInfo()
    t0 = time.perf_counter()
    with GraphPool(spec, buckets, eager=not args.lazy, overrides=overrides, concurrent=not args.serial) as pool:
        total_ms = (time.perf_counter() - t0) * 1e3
        cupy.cuda.Device().synchronize()
        free1, _ = cupy.cuda.runtime.memGetInfo()
        used = free0 - free1
        print(f"{spec.name}: {len(pool.executables)} buckets of {', '.join(pool.buckets)} built in "
              f"{total_ms:.1f} ms ({'lazy' if args.lazy else 'eager'}, method {pool.method})")
        for key, ms in sorted(pool.build_ms.items()):
            print(f"  {dict(zip(pool.buckets, key, strict=True))}: {ms:.2f} ms")
        if pool.phases:
            print("host time by phase: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in pool.phases.items()))
        arena = pool.arena_bytes
        print(f"arena (device buffers at the largest bucket): {arena / 2**20:.1f} MiB")
        print(f"device memory in use after building: {used / 2**20:.1f} MiB; beyond the arena: "
              f"{(used - arena) / 2**20:.1f} MiB")
    return 0


# ---- the parser -------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    from . import __version__
    from .occupancy import SM_LIMITS

    ap = argparse.ArgumentParser(prog="dagbuild", description="Explicit CUDA graphs from validated DAG specs.")
    ap.add_argument("--version", action="version", version=f"dagbuild {__version__}",
                    help="print the version and exit")
    sub = ap.add_subparsers(dest="command", required=True)

    def spec_cmd(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("spec", help="a YAML spec file")
        p.add_argument("--set", action="append", metavar="NAME=VALUE",
                       help="override a dim, const or type (repeatable)")
        p.add_argument("--config", action="append", metavar="FILE",
                       help="a YAML mapping of dim/const/type overrides (applied before --set; repeatable)")
        return p

    p = spec_cmd("validate", "validate a spec; exit 0 valid, 1 invalid, 2 usage")
    p.add_argument("--json", action="store_true", help="print {ok, errors, summary} as JSON (usage errors too)")
    p.set_defaults(func=cmd_validate)
    p = spec_cmd("dot", "the validated, reduced DAG as DOT (or svg/png through Graphviz)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout; png needs a file)")
    p.add_argument("--format", choices=["dot", "svg", "png"],
                   help="output format (default: from -o's suffix .dot/.gv/.svg/.png, else dot)")
    p.set_defaults(func=cmd_dot)
    p = spec_cmd("info", "the validated spec's summary as a table")
    p.add_argument("--hf-config", metavar="PATH", help="Llama specs: an HF config.json (or its directory): plan "
                   "the model it describes and print its weight and KV-cache bytes; exit 1 if not served")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("schema", help="the JSON Schema of the spec format")
    p.set_defaults(func=cmd_schema)
    p = spec_cmd("compile", "compile every kernel (no GPU needed) and check declared params against the code")
    p.add_argument("--arch", help="CUDA architecture for NVRTC, e.g. sm_90 (the default), sm_90a, compute_80")
    p.add_argument("--target", metavar="BACKEND:ARCH",
                   help="cuda:sm_90 (the default; same as --arch) or hip:gfx90a (HIP kernel checks)")
    p.set_defaults(func=cmd_compile)
    p = spec_cmd("occupancy", "per kernel node: blocks an SM holds (registers, shared memory, warps) and how many "
                              "fit beside the node before it, from the cubins (no GPU needed)")
    p.add_argument("--arch", choices=list(SM_LIMITS), default="sm_90",
                   help="the cubins' architecture and its SM limits (default sm_90)")
    p.add_argument("--sms", type=_int_at_least(1, "--sms"), help="SMs of the card (default: the spec's sms dim, "
                   "else 132)")
    p.set_defaults(func=cmd_occupancy)
    p = spec_cmd("run", "build and launch (a spec's `runner`, e.g. Llama greedy decoding); without a GPU, "
                        "validate and write the DOT")
    p.add_argument("--steps", type=_int_at_least(1, "--steps"), default=100,
                   help="launches of a generic spec (default 100)")
    p.add_argument("--dot", metavar="FILE", help="where to write the DOT when no GPU is present (default NAME.dot)")
    p.add_argument("--prompt", metavar="TEXT",
                   help="Llama: prompt text, tokenized with the checkpoint's tokenizer.json (needs --weights)")
    p.add_argument("--prompt-ids", metavar="IDS",
                   help="Llama: comma-separated prompt token ids (default 1,15043,29892,590,1024,338,263,1243)")
    p.add_argument("--chat", action="store_true", help="Llama: apply the checkpoint's chat template to --prompt")
    p.add_argument("--tokens", type=_int_at_least(1, "--tokens"), default=64,
                   help="Llama: tokens to generate (default 64)")
    p.add_argument("--weights", metavar="DIR", help="Llama: HF checkpoint directory (config.json + safetensors; "
                   "its dims, dtype and consts set the plan's, --set on top)")
    p.add_argument("--random-weights", type=_int_at_least(0, "--random-weights"), metavar="SEED",
                   help="Llama: random weights from SEED (default: seed 0 when --weights is not given)")
    p.add_argument("--no-progress", action="store_true", help="Llama: no progress line while decoding")
    p.add_argument("--prefill", choices=("graph", "positions"), default="graph",
                   help="Llama: prompt through prefill graphs pooled by length (default; needs the fused spec's "
                        "packed weights) or through the decode graph one position at a time")
    p.add_argument("--tokens-per-launch", type=_int_at_least(1, "--tokens-per-launch"), metavar="K",
                   help="Llama: K decode steps per graph launch (a loop node; sampling and stopping on the device)")
    p.add_argument("--temperature", type=_float_in(0.0, 1e4, "--temperature"), default=0.0,
                   help="Llama: sampling temperature (0: greedy, the default); > 0 decodes through the loop")
    p.add_argument("--top-k", type=_int_at_least(0, "--top-k"), default=0, help="Llama: top-k sampling (0: off)")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, "--top-p", low_open=True), default=1.0,
                   help="Llama: nucleus sampling (1: off)")
    p.add_argument("--seed", type=_int_at_least(0, "--seed"), default=0,
                   help="Llama: sampling seed (per row: seed + row)")
    p.add_argument("--eos", type=_int_at_least(-1, "--eos"), default=-1,
                   help="Llama: stop a row at this token id (-1: none; needs the loop)")
    p.set_defaults(func=cmd_run)
    p = spec_cmd("bench", "eager vs stream-captured vs explicit graph, one run on one stream")
    p.add_argument("--steps", type=_int_at_least(1, "--steps"), default=500,
                   help="timed launches per mode (default 500)")
    p.add_argument("--warmup", type=_int_at_least(0, "--warmup"), default=20,
                   help="untimed launches first (default 20)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_bench)
    p = spec_cmd("pool", "build a graph per bucket over one arena; print build time and memory")
    p.add_argument("--buckets", action="append", metavar="DIM=1,2,4", required=True,
                   help="a dim of the spec and its bucket sizes, integers ≥ 1 (repeatable)")
    p.add_argument("--lazy", action="store_true", help="build no bucket until it is first used")
    p.add_argument("--serial", action="store_true",
                   help="chain each graph's nodes: no concurrency, ~12x less driver memory per graph")
    p.set_defaults(func=cmd_pool)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, FileNotFoundError) as e:
        print(f"dagbuild {args.command}: {e}", file=sys.stderr)
        return 2
    except SpecError as e:
        _print_issues(e, getattr(args, "spec", "spec"))
        return 1
    except DagbuildError as e:
        print(f"dagbuild {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
