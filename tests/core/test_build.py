"""The default selector really is the compiled extension, and the switch to the reference works."""

import importlib.machinery
import os
import subprocess
import sys
import types

import core_ext
from core_ext import _selector, reference


def test_extension_module_is_a_compiled_shared_object():
    assert _selector.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert isinstance(_selector.__loader__, importlib.machinery.ExtensionFileLoader)


def test_compiled_selector_is_an_extension_type_not_python_code():
    cls = _selector.Selector
    assert not isinstance(cls.__dict__["pick"], types.FunctionType)  # a C function, no bytecode
    assert "__dict__" not in dir(cls())  # a cdef class has no per-instance dict
    assert cls is not reference.Selector


def test_default_import_is_the_compiled_one():
    if os.environ.get("IMDISPATCH_PURE_PYTHON", "") not in ("", "0"):
        raise AssertionError("the test suite must run with the compiled core by default")
    assert core_ext.Selector is _selector.Selector
    assert core_ext.IMPLEMENTATION == "compiled"


def test_environment_switch_selects_the_reference():
    code = "import core_ext; print(core_ext.IMPLEMENTATION, core_ext.Selector.__module__)"
    env = {**os.environ, "IMDISPATCH_PURE_PYTHON": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["reference", "core_ext.reference"]
