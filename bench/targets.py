"""Speed targets: figures recorded by the benchmarks, judged once at the end of the run.

Ratios compare medians measured in the same run on the same machine, so they hold on a
busy shared machine where absolute times drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MEDIANS: dict[tuple[str, str], float] = {}
"""(case, implementation) -> median seconds per call."""


def record(case: str, implementation: str, benchmark) -> None:
    if benchmark.stats:  # absent under --benchmark-disable
        MEDIANS[case, implementation] = benchmark.stats.stats.median


@dataclass(frozen=True)
class Target:
    case: str
    description: str
    value: Callable[[str], float | None]  # case -> measured figure, None when not measured
    unit: str
    met: Callable[[float], bool]


def compiled_ns(case: str) -> float | None:
    median = MEDIANS.get((case, "compiled"))
    return None if median is None else median * 1e9


def speedup(case: str) -> float | None:
    fast, slow = MEDIANS.get((case, "compiled")), MEDIANS.get((case, "reference"))
    return None if fast is None or slow is None else slow / fast


TARGETS = [
    Target("pick, 8 nodes", "compiled pick() <= 100 ns", compiled_ns, "ns", lambda v: v <= 100),
    Target("pick, 64 nodes", "compiled >= 25x reference", speedup, "x", lambda v: v >= 25),
]


def table() -> tuple[list[str], bool]:
    """Lines of the summary table, and whether every measured target was met."""
    lines = [f"{'case':<28} {'compiled':>12} {'reference':>12} {'ratio':>8}"]
    for case in sorted({case for case, _ in MEDIANS}, key=_case_order):
        fast, slow = MEDIANS.get((case, "compiled")), MEDIANS.get((case, "reference"))
        ratio = speedup(case)
        lines.append(
            f"{case:<28} {_ns(fast):>12} {_ns(slow):>12} "
            f"{'' if ratio is None else f'{ratio:.1f}x':>8}"
        )
    all_met = True
    for target in TARGETS:
        value = target.value(target.case)
        if value is None:
            lines.append(f"target {target.description} [{target.case}]: not measured")
            continue
        met = target.met(value)
        all_met &= met
        lines.append(
            f"target {target.description} [{target.case}]: {value:.1f} {target.unit} "
            f"{'met' if met else 'MISSED'}"
        )
    return lines, all_met


def _ns(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e9:,.0f} ns"


def _case_order(case: str) -> tuple[str, int]:
    name, _, rest = case.partition(", ")
    return name, int(rest.split()[0]) if rest else 0
