"""dagbuild: LLM decode steps as explicit CUDA/HIP graphs, declared as a validated DAG.

spec (YAML or :class:`Graph`) → :func:`plan` (bound, validated, reduced DAG) → :func:`build`
(an :class:`~dagbuild.executable.Executable` on the GPU) → :class:`~dagbuild.pool.GraphPool`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .dsl import Graph, SpecBuilder
from .errors import BuildError, CompileError, DagbuildError, DriverError, Issue, SpecError
from .ir import Plan
from .load import load_spec, parse_spec
from .plan import plan
from .spec import GraphSpec

if TYPE_CHECKING:
    from .executable import ExecOptions, Executable

__version__ = "0.1.0"


def build(spec: GraphSpec | Plan | str, overrides: dict[str, Any] | None = None,
          options: ExecOptions | None = None, **kwargs: Any) -> Executable:
    """Plan (if needed) and build an executable graph on the GPU. ``options`` are its
    :class:`~dagbuild.executable.ExecOptions`; ``kwargs`` its resources (``backend``, ``bound``,
    ``modules``, ``stream``). See :class:`~dagbuild.executable.Executable`."""
    from .executable import Executable

    if isinstance(spec, str):
        spec = load_spec(spec)
    p = spec if isinstance(spec, Plan) else plan(spec, overrides)
    return Executable(p, options, **kwargs)


__all__ = ["SpecBuilder", "Graph", "GraphSpec", "Plan", "plan", "build", "load_spec", "parse_spec", "Issue",
           "DagbuildError", "SpecError", "CompileError", "DriverError", "BuildError", "__version__"]
