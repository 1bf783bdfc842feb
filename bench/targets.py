"""Speed targets: figures recorded by the benchmarks, judged once at the end of the run.

Ratios compare medians measured in the same run on the same machine, so they hold on a
busy shared machine where absolute times drift; throughputs are printed with the machine
they were measured on in mind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MEDIANS: dict[tuple[str, str], float] = {}
"""(case, implementation) -> median seconds per call, compiled vs reference."""

FIGURES: dict[str, tuple[float, str]] = {}
"""name -> (value, unit) for throughput and duration scenarios."""


SERIES: dict[str, object] = {}
"""name -> data for the report's plots (JSON-serialisable)."""

SKIPPED: list[tuple[str, str]] = []
"""(benchmark, reason) for every scenario this run skipped."""


def series(name: str, data: object) -> None:
    SERIES[name] = data


def record(case: str, implementation: str, benchmark) -> None:
    if benchmark.stats:  # absent under --benchmark-disable
        MEDIANS[case, implementation] = benchmark.stats.stats.median


def figure(name: str, value: float, unit: str, benchmark=None) -> None:
    FIGURES[name] = (value, unit)
    if benchmark is not None:
        benchmark.extra_info[name] = round(value, 3)


def compiled_ns(case: str) -> float | None:
    return median_ns(case, "compiled")


def median_ns(case: str, implementation: str) -> float | None:
    median = MEDIANS.get((case, implementation))
    return None if median is None else median * 1e9


def speedup(case: str) -> float | None:
    fast, slow = MEDIANS.get((case, "compiled")), MEDIANS.get((case, "reference"))
    return None if fast is None or slow is None else slow / fast


def measured(name: str) -> float | None:
    value = FIGURES.get(name)
    return None if value is None else value[0]


def _worst(name: str) -> float | None:
    """The largest of a figure measured per worker count (1, 2, 4), if any was."""
    values = [measured(name.format(workers)) for workers in (1, 2, 4)]
    values = [value for value in values if value is not None]
    return max(values) if values else None


FAST, PLAIN, BARE, NGINX = ("get-tcp-ip, fast path", "get-tcp-ip, plain route", "bare Sanic",
                            "nginx")
HTTP_SERVERS = (FAST, PLAIN, BARE, NGINX)
"""The servers of the HTTP benchmark, in the report's order: the dispatcher with
`[http] fast_path = true` and `false`, a bare Sanic route, nginx returning a constant."""


def http(scenario: str, what: str) -> str:
    """The name of an HTTP figure: `http("keep-alive, 1 worker", "bare Sanic: p99")`."""
    return f"HTTP {scenario}: {what}"


FAILOVER_POLL = 1.0  # the [poll] interval of the failover benchmark (the default)
FAILOVER_LEASES = (2.0, 3.0)
JOIN_SERVES = "join 1M events from a snapshot: start to get-tcp-ip 200"
JETSTREAM_BACKEND, FILE_BACKEND = "JetStream backend", "file backend"


def failover(lease: float, what: str) -> str:
    """The name of a cluster failover figure: `failover(2.0, "longest")`."""
    return (f"cluster failover, lease {lease:g} s, poll {FAILOVER_POLL:g} s: leader SIGKILL "
            f"to the new leader's first full poll cycle ({what})")


def per_replica(scenario: str, what: str) -> str:
    """The name of a get-tcp-ip-per-replica figure: `per_replica("keep-alive, 1 worker",
    f"{JETSTREAM_BACKEND} / {FILE_BACKEND}")`."""
    return f"get-tcp-ip per replica, {scenario}: {what}"


@dataclass(frozen=True)
class Target:
    description: str
    value: Callable[[], float | None]  # None when not measured in this run
    unit: str
    met: Callable[[float], bool]


TARGETS = [
    Target("compiled pick() at 8 nodes <= 100 ns",
           lambda: compiled_ns("pick, 8 nodes"), "ns", lambda v: v <= 100),
    Target("compiled pick() with the shared ledger and caps at 8 nodes <= 150 ns",
           lambda: compiled_ns("pick, 8 nodes, shared ledger + caps"), "ns",
           lambda v: v <= 150),
    Target("fill with 1, 2 and 4 workers: no node past ceil(high_watermark x capacity)",
           lambda: _worst("fill, {} workers: clients past the watermark (most)"), "clients",
           lambda v: v <= 0),
    Target("fill with 1, 2 and 4 workers: assignments/s within the cap + a second's burst",
           lambda: _worst("fill, {} workers: peak assignments/s over cap + burst"), "x",
           lambda v: v <= 1),
    Target("compiled pick() at 64 nodes >= 25x the reference",
           lambda: speedup("pick, 64 nodes"), "x", lambda v: v >= 25),
    Target("file log append with fsync=batch >= 100k events/s",
           lambda: measured("append fsync=batch"), "events/s", lambda v: v >= 100_000),
    Target("replay (read + verify + apply) >= 300k events/s",
           lambda: measured("replay rate"), "events/s", lambda v: v >= 300_000),
    Target("1M-event replay from a snapshot-less log < 4 s",
           lambda: measured("replay 1M events"), "s", lambda v: v < 4),
    Target("JetStream append, 20k one-event appends in flight >= 50k events/s",
           lambda: measured("jetstream append (pipelined)"), "events/s",
           lambda v: v >= 50_000),
    Target("JetStream replay (read + verify + apply), weight changes >= 150k events/s",
           lambda: measured("jetstream replay (journal open), weight changes"), "events/s",
           lambda v: v >= 150_000),
    Target("imnode holds 10,000 idle connections with heartbeats",
           lambda: measured("imnode idle connections"), "", lambda v: v >= 10_000),
    Target("imnode RSS per idle connection <= 8 KiB",
           lambda: measured("imnode RSS per idle connection"), "bytes", lambda v: v <= 8192),
    Target("poll cycle at 1000 nodes <= 50 ms (median)",
           lambda: measured("poll cycle median, 1000 nodes"), "ms", lambda v: v <= 50),
    Target("failure detection after SIGKILL <= 1 s",
           lambda: measured("failure detection after SIGKILL (poll interval 1 s)"), "s",
           lambda v: v <= 1),
    Target("get-tcp-ip, keep-alive, 1 worker: >= 2.0x the bare Sanic route",
           lambda: measured(http("keep-alive, 1 worker", f"{FAST} / {BARE}")), "x",
           lambda v: v >= 2.0),
    Target("get-tcp-ip, keep-alive, 2 workers: >= 2.0x bare Sanic with 2 workers",
           lambda: measured(http("keep-alive, 2 workers", f"{FAST} / {BARE}")), "x",
           lambda v: v >= 2.0),
    Target("get-tcp-ip, one request per connection, 1 worker: >= 1.2x bare Sanic",
           lambda: measured(http("Connection: close, 1 worker", f"{FAST} / {BARE}")), "x",
           lambda v: v >= 1.2),
    Target("get-tcp-ip p99 under the keep-alive load (1 worker) <= the bare route's",
           lambda: measured(http("keep-alive, 1 worker", f"{FAST} p99 / {BARE} p99")), "x",
           lambda v: v <= 1.0),
    Target("reconnect storm: each survivor's share within 10% of its weight's",
           lambda: measured("storm: largest share deviation from the weights"), "%",
           lambda v: v <= 10),
    Target("reconnect storm: no survivor over its high watermark",
           lambda: measured("storm: survivors over their high watermark"), "",
           lambda v: v == 0),
    Target("soak: dispatcher RSS growth after warm-up < 5%",
           lambda: measured("soak: RSS growth after warm-up"), "%", lambda v: v < 5),
    Target("imnode status request at 10k connections < 1 ms (p50, NATS round trip included)",
           lambda: measured("imnode status request p50 at 10k connections"), "ms",
           lambda v: v < 1),
]


TARGETS += [  # cluster mode (bench/test_cluster.py)
    *(Target(f"cluster failover, lease {lease:g} s: the new leader's first full poll cycle "
             f"<= lease + poll interval + 1 s = {lease + FAILOVER_POLL + 1:g} s (longest)",
             lambda lease=lease: measured(failover(lease, "longest")), "s",
             lambda v, lease=lease: v <= lease + FAILOVER_POLL + 1)
      for lease in FAILOVER_LEASES),
    Target("a replica joining a 1M-event stream (snapshot beside it) serves within 3 s",
           lambda: measured(JOIN_SERVES), "s", lambda v: v <= 3),
    *(Target(f"get-tcp-ip per replica, {scenario}: JetStream backend >= 0.95x the file "
             "backend", lambda scenario=scenario: measured(
                 per_replica(scenario, f"{JETSTREAM_BACKEND} / {FILE_BACKEND}")), "x",
             lambda v: v >= 0.95)
      for scenario in ("keep-alive, 1 worker", "Connection: close, 1 worker")),
]


def table() -> tuple[list[str], bool]:
    """Lines of the summary, and whether every measured target was met."""
    lines = []
    if MEDIANS:
        lines.append(f"{'case':<28} {'compiled':>12} {'reference':>12} {'ratio':>8}")
        for case in sorted({case for case, _ in MEDIANS}, key=_case_order):
            ratio = speedup(case)
            lines.append(
                f"{case:<28} {_ns(MEDIANS.get((case, 'compiled'))):>12} "
                f"{_ns(MEDIANS.get((case, 'reference'))):>12} "
                f"{'' if ratio is None else f'{ratio:.1f}x':>8}"
            )
    for name, (value, unit) in FIGURES.items():
        lines.append(f"{name:<50} {value:>14,.2f} {unit}")
    all_met = True
    for target in TARGETS:
        value = target.value()
        if value is None:
            continue
        met = target.met(value)
        all_met &= met
        lines.append(
            f"target: {target.description}: {value:,.2f} {target.unit} "
            f"{'met' if met else 'MISSED'}"
        )
    return lines, all_met


def as_json() -> dict[str, object]:
    """Everything this run measured, for the report."""
    judged = []
    for target in TARGETS:
        value = target.value()
        judged.append({"target": target.description, "value": value, "unit": target.unit,
                       "met": None if value is None else target.met(value)})
    return {
        "core": [{"case": case, "compiled_ns": median_ns(case, "compiled"),
                  "reference_ns": median_ns(case, "reference"), "ratio": speedup(case)}
                 for case in sorted({case for case, _ in MEDIANS}, key=_case_order)],
        "figures": [{"name": name, "value": value, "unit": unit}
                    for name, (value, unit) in FIGURES.items()],
        "targets": judged,
        "skipped": [{"benchmark": nodeid, "reason": reason} for nodeid, reason in SKIPPED],
        "series": SERIES,
    }


def _ns(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e9:,.0f} ns"


def _case_order(case: str) -> tuple[str, int]:
    name, _, rest = case.partition(", ")
    return name, int(rest.split()[0]) if rest else 0
