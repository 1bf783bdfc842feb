"""The selection core: smooth weighted round-robin with dynamic weights and overload limits.

`Selector` is the compiled implementation (`core_ext._selector`). Set the environment
variable IMDISPATCH_PURE_PYTHON=1 to run the pure-Python reference instead. A missing
build is an error, never a silent 25x slowdown.
"""

import os

from core_ext._rules import MAX_COUNT, MAX_WEIGHT, overloaded_after
from core_ext._rules import watermarks as watermarks_ppm
from core_ext._snapshot import FORMAT_VERSION as SELECTOR_STATE_VERSION
from core_ext.errors import (
    DuplicateNode,
    InvalidArgument,
    InvalidArgumentType,
    SelectorError,
    UnknownNode,
)

PURE_PYTHON = os.environ.get("IMDISPATCH_PURE_PYTHON", "") not in ("", "0")
"""True when IMDISPATCH_PURE_PYTHON asks every compiled module to use its Python twin."""

if PURE_PYTHON:
    from core_ext.reference import Selector

    IMPLEMENTATION = "reference"
else:
    try:
        from core_ext._selector import Selector
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise ImportError(
            "core_ext's compiled extension is not built: run `pip install -e .` (or "
            "`make test`), or set IMDISPATCH_PURE_PYTHON=1 to use the pure-Python reference"
        ) from exc
    IMPLEMENTATION = "compiled"

__all__ = [
    "IMPLEMENTATION",
    "MAX_COUNT",
    "MAX_WEIGHT",
    "PURE_PYTHON",
    "SELECTOR_STATE_VERSION",
    "DuplicateNode",
    "InvalidArgument",
    "InvalidArgumentType",
    "Selector",
    "SelectorError",
    "UnknownNode",
    "overloaded_after",
    "watermarks_ppm",
]
