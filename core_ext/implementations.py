"""Both selector implementations by name, for the tests, the benchmarks and the self-check."""

from core_ext import _selector, reference

IMPLEMENTATIONS: dict[str, type] = {
    "compiled": _selector.Selector,
    "reference": reference.Selector,
}
