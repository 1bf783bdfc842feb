"""Builds the compiled selection core; everything else is declared in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

# Speed directives: the hot loop indexes C arrays whose bounds the class maintains itself,
# and every division is of non-negative integers, so Python's checks buy nothing there.
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "embedsignature": True,
}

setup(
    ext_modules=cythonize(
        [Extension("core_ext._selector", ["core_ext/_selector.pyx"])],
        compiler_directives=DIRECTIVES,
    ),
)
