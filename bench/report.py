"""Run the whole benchmark suite and write its report.

    python -m bench.report [--out DIR] [-- PYTEST ARGS]   (what `make bench` runs)

Runs `pytest bench` (progress on the terminal, pytest-benchmark's run saved for
`--benchmark-compare`), then writes into DIR (default `bench/results/<time>/`):
`report.json` with every figure, target, skip and the machine; `report.md`, a summary a
reviewer can read; and PNG plots where a picture says more. Exits with pytest's status,
which is non-zero when a target was missed.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import orjson

from dispatcher.demo.nats_server import NatsServerMissing, nats_server_binary

PACKAGES = ("imdispatch", "sanic", "nats-py", "orjson", "uvloop", "Cython", "pytest",
            "pytest-benchmark", "hypothesis")
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default bench/results/<time>)")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args(argv)
    started = time.time()
    out = args.out or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    figures_path = out / "figures.json"
    figures_path.unlink(missing_ok=True)  # a reused directory: never report an old run
    command = [sys.executable, "-m", "pytest", "bench", "-v", "-p", "no:randomly",
               "--benchmark-autosave", f"--benchmark-json={out / 'pytest-benchmark.json'}",
               "--benchmark-columns=min,median,max,rounds", f"--bench-figures={figures_path}",
               *args.pytest_args]
    print("running:", " ".join(command), flush=True)
    runner = subprocess.Popen(command, cwd=ROOT)
    # a SIGTERM to the report stops the run too (Ctrl-C reaches both already)
    signal.signal(signal.SIGTERM, lambda signum, frame: runner.terminate())
    status = runner.wait()
    if not figures_path.exists():
        print(f"no figures were written (pytest exited with {status})", file=sys.stderr)
        return status or 1
    measured = orjson.loads(figures_path.read_bytes())
    report = {"machine": machine(), "versions": versions(), "started": started,
              "duration_s": round(time.time() - started, 1), "pytest_exit_status": status,
              "command": "make bench", **measured}
    (out / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    plots = draw(measured.get("series", {}), out)
    if (out / "dashboard.png").exists():  # bench/test_dashboard.py's screenshot
        plots.append("dashboard.png")
    (out / "report.md").write_text(markdown(report, plots))
    print(f"\nreport: {out / 'report.md'}\n        {out / 'report.json'}"
          + "".join(f"\n        {out / plot}" for plot in plots))
    return status


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        memory_kib = int(info.readline().split()[1])
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(memory_kib / 2**20, 1), "python": platform.python_version()}


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    found["nats-server"] = _first_line([_nats_server(), "--version"])
    found["wrk"] = _first_line(["wrk", "-v"])
    found["git commit"] = _first_line(["git", "-C", str(ROOT), "describe", "--always",
                                       "--dirty"])
    return found


def _nats_server() -> str:
    try:
        return nats_server_binary()
    except NatsServerMissing:
        return "nats-server"


def _first_line(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def draw(series: dict[str, Any], out: Path) -> list[str]:
    """PNG plots of the series that have one; [] without matplotlib (said in the report)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return []
    written = []
    storm = series.get("storm: assignments per node")
    if storm:
        figure, axes = pyplot.subplots(figsize=(8, 4.5))
        step = storm["bucket_s"]
        for node, counts in storm["per_node"].items():
            axes.plot([i * step for i in range(len(counts))], [c / step for c in counts],
                      label=f"{node} (weight {storm['weights'][node]})")
        axes.set_xlabel("seconds after the node died")
        axes.set_ylabel("clients assigned per second")
        axes.set_title("Reconnect storm: where the dead node's clients went")
        axes.legend()
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / "storm-assignments.png", dpi=110)
        pyplot.close(figure)
        written.append("storm-assignments.png")
    latency = {name: data for name, data in series.items()
               if name.startswith("latency percentiles")}
    if latency:
        figure, all_axes = pyplot.subplots(1, len(latency), figsize=(5 * len(latency), 4),
                                           squeeze=False)
        for axes, (name, routes) in zip(all_axes[0], sorted(latency.items()), strict=True):
            for route, points in routes.items():
                axes.plot([p for p, _ in points], [ms for _, ms in points], label=route)
            axes.set_xlabel("percentile")
            axes.set_ylabel("latency (ms)")
            axes.set_title(name.replace("latency percentiles", "wrk latency"))
            axes.legend()
            axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / "http-latency.png", dpi=110)
        pyplot.close(figure)
        written.append("http-latency.png")
    return written


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(report["started"]))
    lines = ["# imdispatch benchmark report", "",
             f"Run with `{report['command']}` on {when}, {report['duration_s']:.0f} s. "
             "Ratios compare figures measured in this one run; absolute times drift on "
             "shared machines.", "", "## Machine and versions",
             "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in
              {**report["machine"], **report["versions"]}.items()]
    lines += ["", "## Targets", "", "| target | measured | |", "|---|---|---|"]
    for target in report["targets"]:
        if target["value"] is None:
            lines.append(f"| {target['target']} | not measured | skipped |")
        else:
            lines.append(f"| {target['target']} | {_number(target['value'])} {target['unit']}"
                         f" | {'met' if target['met'] else '**MISSED**'} |")
    if report["core"]:
        lines += ["", "## Selection core: compiled vs reference (medians)", "",
                  "| case | compiled | reference | ratio |", "|---|---|---|---|"]
        for row in report["core"]:
            ratio = f"{row['ratio']:.1f}x" if row["ratio"] else "-"
            lines.append(f"| {row['case']} | {_ns(row['compiled_ns'])} | "
                         f"{_ns(row['reference_ns'])} | {ratio} |")
    side_by_side = http_tables(report.get("series", {}))
    lines += side_by_side
    lines += ["", "## Figures", "", "| figure | value |", "|---|---|"]
    lines += [f"| {f['name']} | {_number(f['value'])} {f['unit']} |"
              for f in report["figures"]
              if not (side_by_side and f["name"].startswith(HTTP_FIGURES))]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{plot}]({plot})" for plot in plots]
    elif report.get("series"):
        lines += ["", "No plots: install matplotlib (`pip install -e '.[test]'`)."]
    lines += ["", "## Skipped", ""]
    lines += [f"- `{s['benchmark']}`: {s['reason']}" for s in report["skipped"]] or ["nothing"]
    return "\n".join(lines) + "\n"


HTTP_FIGURES = "HTTP "  # bench.targets.http's names: shown in the side-by-side tables


def http_tables(series: dict[str, Any]) -> list[str]:
    """One table a scenario of the HTTP benchmark: every server's req/s, p99 and its
    throughput next to bare Sanic's and nginx's, measured in the same run."""
    lines = []
    for name, scenario in series.items():
        if not name.startswith("http: "):
            continue
        if not lines:
            lines += ["", "## get-tcp-ip side by side (wrk on loopback, same request)", "",
                      "wrk runs one thread per server worker on the same machine: a server "
                      "as fast as that thread can open connections or send requests (nginx, "
                      "often) shows the client's limit, not its own."]
        runs = scenario["servers"]
        bare, nginx = runs.get("bare Sanic"), runs.get("nginx")
        lines += ["", f"### {name.removeprefix('http: ')}", "", f"`{scenario['wrk']}`", "",
                  "| server | requests/s | p99 | x bare Sanic | x nginx |",
                  "|---|---|---|---|---|"]
        for server, run in runs.items():
            lines.append(f"| {server} | {run['rate']:,.0f} | {run['p99_ms']:.2f} ms | "
                         f"{_ratio(run, bare)} | {_ratio(run, nginx)} |")
        fast, plain = runs.get("get-tcp-ip, fast path"), runs.get("get-tcp-ip, plain route")
        if fast and plain:
            lines += ["", f"The fast path answers {_ratio(fast, plain)} the plain Sanic "
                          "route's requests/s."]
    return lines


def _ratio(run: dict[str, float], other: dict[str, float] | None) -> str:
    return "-" if other is None else f"{run['rate'] / other['rate']:.2f}x"


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def _ns(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ns"


if __name__ == "__main__":
    sys.exit(main())
