"""The selection core: smooth weighted round-robin with dynamic weights and overload limits.

`Selector` is the compiled implementation (`core_ext._selector`). Set the environment
variable IMDISPATCH_PURE_PYTHON=1 to run the pure-Python reference instead. A missing
build is an error, never a silent 25x slowdown.
"""

import importlib
import os
from types import ModuleType

from core_ext._rules import MAX_COUNT, MAX_NODES, MAX_WEIGHT, overloaded_after
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


def compiled_or_twin(compiled: str, twin: str) -> ModuleType:
    """The compiled module, or its pure-Python twin under IMDISPATCH_PURE_PYTHON=1.

    A missing build is an error with instructions, never a silent fallback to the slower
    twin.
    """
    if PURE_PYTHON:
        return importlib.import_module(twin)
    try:
        return importlib.import_module(compiled)
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise ImportError(
            f"{compiled} is not built: run `pip install -e .` (or `make test`), or set "
            f"IMDISPATCH_PURE_PYTHON=1 to use its pure-Python twin {twin}"
        ) from exc


Selector = compiled_or_twin("core_ext._selector", "core_ext.reference").Selector
IMPLEMENTATION = "reference" if PURE_PYTHON else "compiled"

__all__ = [
    "IMPLEMENTATION",
    "MAX_COUNT",
    "MAX_NODES",
    "MAX_WEIGHT",
    "PURE_PYTHON",
    "SELECTOR_STATE_VERSION",
    "DuplicateNode",
    "InvalidArgument",
    "InvalidArgumentType",
    "Selector",
    "SelectorError",
    "UnknownNode",
    "compiled_or_twin",
    "overloaded_after",
    "watermarks_ppm",
]
