"""GraphSpec → Plan: bind (:mod:`dagbuild.bind`), then analyse (:mod:`dagbuild.dag`), in one call.

A Plan (:mod:`dagbuild.ir`) is plain data: every number a kernel launch, memcpy or memset needs, the
bytes each node reads and writes, and the reduced DAG. It allocates nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .bind import bind
from .dag import analyze
from .errors import SpecError
from .ir import Plan
from .spec import GraphSpec

__all__ = ["Plan", "plan"]


def plan(spec: GraphSpec, overrides: Mapping[str, Any] | None = None, **dims: Any) -> Plan:
    """Bind and validate a spec: the Plan with its reduced DAG, or SpecError listing every issue."""
    p, issues = bind(spec, {**(overrides or {}), **dims})
    analysis, found = analyze(p, complete=not issues)
    issues += found
    if issues:
        raise SpecError(issues)
    return replace(p, analysis=analysis)
