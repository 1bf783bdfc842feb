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

EXTENSIONS = [
    Extension("core_ext._selector", ["core_ext/_selector.pyx"]),
    # get-tcp-ip's fast path: reading a request head and framing the answer.
    Extension("core_ext._fastpath", ["core_ext/_fastpath.pyx"]),
    # Replay's record scanner: CRC-32 from zlib, SHA-256 from OpenSSL's libcrypto (both
    # already there for CPython itself; the build needs their headers).
    # Bulk reads from JetStream: whole message frames past nats-py's parser.
    Extension("dispatcher.eventlog._frames", ["dispatcher/eventlog/_frames.pyx"]),
    Extension(
        "dispatcher.eventlog._scan",
        ["dispatcher/eventlog/_scan.pyx"],
        libraries=["z", "crypto"],
        define_macros=[("OPENSSL_SUPPRESS_DEPRECATED", None)],
    ),
]

setup(ext_modules=cythonize(EXTENSIONS, compiler_directives=DIRECTIVES))
