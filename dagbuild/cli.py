"""The ``dagbuild`` command: validate, dot, info, schema, compile, run, bench, pool.

Exit codes: 0 success, 1 an invalid spec (or a failed check), 2 a usage error (missing file, bad flag).
Each subcommand is a thin layer over the library; no logic of its own lives here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import DagbuildError, SpecError


class UsageError(Exception):
    pass


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
            out[name.strip()] = value
    return out


def _load(path: str):
    from .load import load_spec

    if not Path(path).is_file():
        raise UsageError(f"spec file not found: {path}")
    return load_spec(path)


def overrides_of(args) -> dict[str, Any]:
    """``--config FILE`` (a YAML mapping of dims/types) then ``--set NAME=VALUE`` on top."""
    out: dict[str, Any] = {}
    for path in getattr(args, "config", None) or []:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise UsageError(f"cannot read --config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise UsageError(f"--config {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise UsageError(f"--config {path} must be a mapping of dim/type names to values")
        out.update(data)
    return out | _overrides(getattr(args, "set", None))


def _plan(args):
    from .plan import plan

    return plan(_load(args.spec), overrides_of(args))


def _print_issues(err: SpecError, spec_path: str) -> None:
    print(f"{spec_path}: invalid spec, {len(err.issues)} error(s):", file=sys.stderr)
    for i in err.issues:
        where = f"{spec_path}:{i.line}: " if i.line else f"{spec_path}: "
        print(f"  {where}[{i.code}] {i.message}", file=sys.stderr)


def cmd_validate(args) -> int:
    try:
        p = _plan(args)
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

    try:
        p = _plan(args)
    except SpecError as e:
        _print_issues(e, args.spec)
        return 1
    text = to_dot(p)
    if args.format == "dot":
        data = text.encode()
    else:
        data = render(text, args.format)
    if args.output:
        try:
            Path(args.output).write_bytes(data)
        except OSError as e:
            raise UsageError(f"cannot write {args.output}: {e.strerror}") from None
        print(f"wrote {args.output} ({len(p.nodes)} nodes, {len(p.edges)} edges)", file=sys.stderr)
    elif args.format == "dot":
        sys.stdout.write(text)
    else:
        raise UsageError(f"--format {args.format} writes binary data: give -o FILE")
    return 0


def format_summary(s: dict) -> str:
    def size(n: int) -> str:
        for unit in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or unit == "GiB":
                return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024
        return str(n)

    rows = [("spec", s["name"]), ("nodes", str(s["nodes"]))]
    rows += [(f"  {k}", str(v)) for k, v in s["nodes_by_kind"].items()]
    rows += [("edges (inferred + after)", str(s["edges"])), ("edges after reduction", str(s["edges_reduced"])),
             ("critical path (nodes)", str(s["critical_path"])), ("max width (nodes at once)", str(s["max_width"])),
             ("buffers", str(s["buffers"]))]
    rows += [(f"  {k} memory", size(v)) for k, v in s["bytes_by_memory"].items()]
    rows += [("dims", ", ".join(f"{k}={v}" for k, v in s["dims"].items()) or "-")]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def cmd_info(args) -> int:
    try:
        p = _plan(args)
    except SpecError as e:
        _print_issues(e, args.spec)
        return 1
    print(format_summary(p.summary))
    return 0


def cmd_schema(args) -> int:
    from .spec import GraphSpec

    schema = GraphSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dagbuild spec (format 1)"
    print(json.dumps(schema, indent=2))
    return 0


def cmd_compile(args) -> int:
    from .kernels import check_plan

    try:
        p = _plan(args)
    except SpecError as e:
        _print_issues(e, args.spec)
        return 1
    try:
        report = check_plan(p, arch=args.arch)
    except SpecError as e:
        _print_issues(e, args.spec)
        return 1
    for name, info in report.items():
        print(f"{name}: {info['entry']} ok ({info['params']} params, {info['ptx_bytes']} bytes of PTX, {args.arch})")
    return 0


def gpu_reason() -> str | None:
    """None when a CUDA device is usable, else a sentence saying why not."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device was found"
        import cuda.bindings.driver  # noqa: F401
    except Exception as e:  # ImportError or a CUDA library/driver that fails to load
        return f"no usable GPU stack ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def cmd_run(args) -> int:
    from .dot import to_dot

    try:
        p = _plan(args)
    except SpecError as e:
        _print_issues(e, args.spec)
        return 1
    is_llama = p.name.startswith("llama_decode")
    reason = gpu_reason()
    if reason is not None:
        dot_path = Path(args.dot or f"{p.name}.dot")
        dot_path.write_text(to_dot(p))
        print(format_summary(p.summary))
        print(f"\nvalid; wrote the reduced DAG to {dot_path} (render: dot -Tsvg {dot_path} -o {p.name}.svg)")
        print(f"\nNo GPU here: {reason}.")
        if is_llama:
            print("On a GPU (pip install 'dagbuild[cuda13]'), this command builds the whole decode step above "
                  "as ONE explicit CUDA graph, loads weights (--weights DIR, an HF Llama checkpoint, or "
                  "--random-weights SEED), runs the prompt through it one position at a time, then decodes "
                  "--tokens N tokens greedily, one graph launch per token, printing them with ms/token.")
        else:
            print("On a GPU (pip install 'dagbuild[cuda13]'), this command builds the graph above explicitly "
                  "(no stream capture), launches it --steps times and prints the time per launch.")
        return 0
    if is_llama:
        from .llama.run import run_cli

        return run_cli(p, args)
    from .bench import run_steps

    result = run_steps(p, steps=args.steps)
    print(f"{p.name}: built {len(p.nodes)} nodes in {result['build_ms']:.2f} ms; {args.steps} launches, "
          f"median {result['median_us']:.1f} µs, p99 {result['p99_us']:.1f} µs per launch")
    return 0


def cmd_bench(args) -> int:
    from .bench import bench, format_bench

    try:
        p = _plan(args)
    except SpecError as e:
        _print_issues(e, args.spec)
        return 1
    reason = gpu_reason()
    if reason is not None:
        print(f"dagbuild bench needs a GPU: {reason}.", file=sys.stderr)
        return 2
    result = bench(p, steps=args.steps, warmup=args.warmup)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def cmd_pool(args) -> int:
    from .pool import pool_cli

    spec = _load(args.spec)
    return pool_cli(spec, args)


def _buckets(text: list[str] | None) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for item in text or []:
        name, sep, values = item.partition("=")
        if not sep:
            raise UsageError(f"--buckets expects NAME=1,2,4,..., got {item!r}")
        try:
            out[name.strip()] = sorted({int(v) for v in values.split(",") if v.strip()})
        except ValueError:
            raise UsageError(f"--buckets {item!r}: values must be integers") from None
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dagbuild", description="Explicit CUDA graphs from validated DAG specs.")
    sub = ap.add_subparsers(dest="command", required=True)

    def spec_cmd(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("spec", help="a YAML spec file")
        p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a dim or type")
        p.add_argument("--config", action="append", metavar="FILE",
                       help="a YAML mapping of dim/type overrides (applied before --set)")
        return p

    p = spec_cmd("validate", "validate a spec; exit 0 valid, 1 invalid, 2 usage")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)
    p = spec_cmd("dot", "the validated, reduced DAG as DOT (or svg/png through Graphviz)")
    p.add_argument("-o", "--output")
    p.add_argument("--format", choices=["dot", "svg", "png"], default="dot")
    p.set_defaults(func=cmd_dot)
    p = spec_cmd("info", "the validated spec's summary as a table")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("schema", help="the JSON Schema of the spec format")
    p.set_defaults(func=cmd_schema)
    p = spec_cmd("compile", "compile every kernel with NVRTC (no GPU needed) and check declared params")
    p.add_argument("--arch", default="sm_90")
    p.set_defaults(func=cmd_compile)
    p = spec_cmd("run", "build and launch (Llama specs: greedy decoding); without a GPU, validate + DOT")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--dot", help="where to write the DOT when no GPU is present")
    p.add_argument("--prompt", default="1,15043,29892,590,1024,338,263,1243",
                   help="Llama: comma-separated prompt token ids")
    p.add_argument("--tokens", type=int, default=64, help="Llama: tokens to generate")
    p.add_argument("--weights", help="Llama: HF checkpoint directory (safetensors)")
    p.add_argument("--random-weights", type=int, metavar="SEED", help="Llama: random weights from SEED")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_run)
    p = spec_cmd("bench", "eager vs stream-captured vs explicit graph, one run on one stream")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    p = spec_cmd("pool", "build a graph per bucket over one arena; print build time and memory")
    p.add_argument("--buckets", action="append", metavar="DIM=1,2,4", required=True)
    p.add_argument("--lazy", action="store_true", help="build no bucket until it is first used")
    p.add_argument("--serial", action="store_true",
                   help="chain each graph's nodes: no concurrency, ~12x less driver memory per graph")
    p.set_defaults(func=cmd_pool)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    try:
        if getattr(args, "buckets", None) is not None:
            args.buckets = _buckets(args.buckets)
        return args.func(args)
    except UsageError as e:
        print(f"dagbuild {args.command}: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
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
