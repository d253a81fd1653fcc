"""Where the shipped specs and kernel sources are: the checkout, or ``<prefix>/share/dagbuild`` of an install.

``pip install .`` (not editable) copies ``specs/`` and ``kernels/`` side by side under
``<prefix>/share/dagbuild`` (pyproject's data-files), so relative ``source: ../kernels/llama.cu`` paths
resolve there exactly as in the checkout.
"""

from __future__ import annotations

import site
import sys
from pathlib import Path

from .errors import DagbuildError


def data_root() -> Path:
    """The folder holding ``specs/`` and ``kernels/``."""
    candidates = [Path(__file__).resolve().parent.parent]  # a checkout (editable installs too)
    for base in (sys.prefix, sys.base_prefix, site.getuserbase()):
        candidates.append(Path(base) / "share" / "dagbuild")
    for root in candidates:
        if (root / "specs").is_dir() and (root / "kernels").is_dir():
            return root
    raise DagbuildError("the shipped specs and kernels were not found (looked in: "
                        f"{', '.join(str(c) for c in candidates)}); reinstall dagbuild")


def shipped_spec(name: str) -> Path:
    """A shipped spec by file name, e.g. ``shipped_spec("llama_decode.yaml")``."""
    return data_root() / "specs" / name
