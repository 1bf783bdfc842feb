"""The dispatcher: poll cycle time at 10/100/1000 nodes, failure detection after SIGKILL,
and HTTP throughput of /get-tcp-ip against a bare Sanic route (wrk, 1 and 2 workers)."""

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench import targets
from bench.processes import start, start_dispatcher, start_imnode, stop, wait_ready
from dispatcher import config as cfg
from dispatcher.domain import decisions
from dispatcher.eventlog.filelog import FileLog
from dispatcher.journal import Journal
from dispatcher.poller import Poller
from tests.nats_server import free_port


@pytest.mark.parametrize("nodes", [10, 100, 1000])
def test_poll_cycle(benchmark, tmp_path, nats_url, nodes):
    """One cycle: request every node's status concurrently, check replies, record events."""
    benchmark.group = "dispatcher poll cycle"

    responder = subprocess.Popen([sys.executable, "-m", "bench.sim_nodes", nats_url,
                                  str(nodes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
    assert responder.stdout.readline().strip() == "ready"

    async def run():
        import nats

        ids = [f"sim{i}" for i in range(nodes)]
        journal = Journal(FileLog(tmp_path / "log", fsync="never"))
        await journal.open()
        for node_id in ids:
            await journal.record(decisions.add_node(journal.state, node_id, "127.0.0.1",
                                                    9000, 1, actor="bench"))
        nc = await nats.connect(nats_url)
        config = cfg.parse("[poll]\ntimeout = 0.5\n")
        poller = Poller(nc, journal, config.poll, config.balance)
        for _ in range(3):  # warm up: nodes come up, loads are recorded
            await poller.cycle()
        times = []
        for _ in range(20):
            started = time.perf_counter()
            assert await poller.cycle()
            times.append(time.perf_counter() - started)
        assert all(r.health == "up" for r in journal.state.nodes.values())
        await nc.close()
        await journal.close()
        return sorted(times)

    try:
        times = benchmark.pedantic(lambda: asyncio.run(run()), rounds=1, iterations=1)
    finally:
        responder.stdin.close()
        responder.wait(timeout=10)
    targets.figure(f"poll cycle median, {nodes} nodes", times[len(times) // 2] * 1000, "ms",
                   benchmark)


def cluster(tmp_path, nats_url, workers, interval=0.5):
    ports = {f"b{i}": free_port() for i in range(3)}
    nodes = []
    try:
        for node_id, port in ports.items():
            nodes.append(start_imnode(node_id, port, nats_url, 100000))
        http_port, dispatcher = start_dispatcher(
            tmp_path, nats_url, {n: (p, i + 1) for i, (n, p) in enumerate(ports.items())},
            workers=workers, interval=interval,
            balance="slow_start = 0\nassign_rate = 1000000000\n")
    except BaseException:
        stop(*nodes)
        raise
    return http_port, dispatcher, nodes


def node_health(port, node_id):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/nodes",
                                     headers={"Authorization": "Bearer bench"})
    with urllib.request.urlopen(request, timeout=2) as response:
        return {n["id"]: n["health"] for n in json.loads(response.read())}[node_id]


def test_failure_detection_after_sigkill(benchmark, tmp_path, nats_url):
    """With the default poll interval (1 s): SIGKILL to the node marked down."""
    benchmark.group = "dispatcher failure detection"
    port, dispatcher, nodes = cluster(tmp_path, nats_url, 1, interval=1.0)
    try:
        deadline = time.monotonic() + 10
        while node_health(port, "b0") != "up":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.37)  # not in step with the poll cycle

        def detect():
            nodes[0].send_signal(signal.SIGKILL)
            nodes[0].wait()
            killed = time.monotonic()
            while node_health(port, "b0") != "down":
                assert time.monotonic() - killed < 30, "the killed node never went down"
                time.sleep(0.01)
            return time.monotonic() - killed

        seconds = benchmark.pedantic(detect, rounds=1, iterations=1)
    finally:
        stop(dispatcher, *nodes)
    targets.figure("failure detection after SIGKILL (poll interval 1 s)", seconds, "s",
                   benchmark)


WRK = shutil.which("wrk")


PERCENTILES = Path(__file__).with_name("wrk_percentiles.lua")


@dataclass(frozen=True)
class WrkRun:
    rate: float  # requests per second
    p99_ms: float
    non_2xx: int
    percentiles: list[tuple[float, float]]  # (percentile, latency in ms)


def wrk(url, seconds=5) -> WrkRun:
    result = subprocess.run([WRK, "-t2", "-c64", f"-d{seconds}s", "-s", str(PERCENTILES), url],
                            capture_output=True, text=True, timeout=seconds + 30, check=True)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))
    points = [(float(p), int(us) / 1000) for p, us in
              re.findall(r"^pct ([\d.]+) (\d+)$", result.stdout, re.MULTILINE)]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    return WrkRun(rate, dict(points)[99.0], int(non_2xx.group(1)) if non_2xx else 0, points)


@pytest.mark.skipif(WRK is None, reason="wrk not installed: apt-get install wrk")
@pytest.mark.parametrize("workers", [1, 2])
def test_get_tcp_ip_against_a_bare_sanic_route(benchmark, tmp_path, nats_url, workers):
    benchmark.group = "dispatcher HTTP"
    port, dispatcher, nodes = cluster(tmp_path, nats_url, workers)
    bare_port = free_port()
    bare = start([sys.executable, "-m", "bench.bare_sanic", str(bare_port), str(workers)])
    try:
        wait_ready(f"http://127.0.0.1:{bare_port}/get-tcp-ip")

        def measure():
            """Alternate the two, three rounds each, and keep each one's median: on a
            shared 2-core machine one run of either can be 15% off."""
            request = "/get-tcp-ip?uid=bench"
            wrk(f"http://127.0.0.1:{port}{request}", 1)  # warm up both
            wrk(f"http://127.0.0.1:{bare_port}{request}", 1)
            ours, theirs = [], []
            for _ in range(3):
                ours.append(wrk(f"http://127.0.0.1:{port}{request}", 3))
                theirs.append(wrk(f"http://127.0.0.1:{bare_port}{request}", 3))
            def median(runs):
                return sorted(runs, key=lambda run: run.rate)[1]

            return median(ours), median(theirs), sum(run.non_2xx for run in ours)

        mine, bare_run, errors = benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        stop(bare, dispatcher, *nodes)
    assert errors == 0, f"{errors} non-2xx answers"
    name = f"get-tcp-ip, {workers} worker(s)"
    rate, bare_rate = mine.rate, bare_run.rate
    targets.figure(f"{name}: requests/s", rate, "req/s", benchmark)
    targets.figure(f"bare Sanic, {workers} worker(s): requests/s", bare_rate, "req/s", benchmark)
    targets.figure(f"{name}: p99", mine.p99_ms, "ms", benchmark)
    targets.figure(f"bare Sanic, {workers} worker(s): p99", bare_run.p99_ms, "ms", benchmark)
    targets.figure(f"{name}: p99 / bare p99", mine.p99_ms / bare_run.p99_ms, "x", benchmark)
    targets.series(f"latency percentiles, {workers} worker(s)",
                   {"get-tcp-ip": mine.percentiles, "bare Sanic": bare_run.percentiles})
    targets.figure(f"{name}: throughput / bare", rate / bare_rate, "x", benchmark)
