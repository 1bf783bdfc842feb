"""One wrk run on loopback: requests/s, p99 and the latency distribution.

`close=True` sends `Connection: close`, so every request comes on a new connection (what a
phone does); otherwise the connections are kept alive."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

WRK = shutil.which("wrk")
PERCENTILES = Path(__file__).with_name("wrk_percentiles.lua")


@dataclass(frozen=True)
class WrkRun:
    rate: float  # requests per second
    p99_ms: float
    non_2xx: int
    errors: int  # connect, read, write and timeout errors together
    percentiles: list[tuple[float, float]]  # (percentile, latency in ms)


def command(url: str, seconds: int = 3, *, threads: int = 2, connections: int = 64,
            close: bool = False) -> list[str]:
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
            *(["-H", "Connection: close"] if close else []), "-s", str(PERCENTILES), url]


def run(url: str, seconds: int = 3, **options) -> WrkRun:
    """`options`: those of `command`."""
    assert url.startswith("http://127.0.0.1:"), "load only ever goes to loopback"
    argv = command(url, seconds, **options)
    result = subprocess.run([WRK, *argv[1:]], capture_output=True, text=True,
                            timeout=seconds + 30, check=True)
    return parse(result.stdout)


def describe(seconds: int, **options) -> str:
    """The command line, for a report: `wrk -t1 -c64 -d2s ... URL`."""
    argv = command("http://127.0.0.1:PORT/get-tcp-ip?uid=bench", seconds, **options)
    return shlex.join(argv).replace(str(PERCENTILES), f"bench/{PERCENTILES.name}")


def parse(output: str) -> WrkRun:
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    points = [(float(p), int(us) / 1000) for p, us in
              re.findall(r"^pct ([\d.]+) (\d+)$", output, re.MULTILINE)]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       output)
    return WrkRun(rate, dict(points)[99.0], int(non_2xx.group(1)) if non_2xx else 0,
                  sum(map(int, errors.groups())) if errors else 0, points)
