"""The dispatcher: poll cycle time at 10/100/1000 nodes, failure detection after SIGKILL,
and HTTP throughput and p99 of /get-tcp-ip (fast path and plain route) side by side with a
bare Sanic route and nginx (wrk on loopback, 1 and 2 workers, kept-alive connections and
one request per connection)."""

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest

from bench import servers, targets, wrk
from bench.processes import stop
from dispatcher import config as cfg
from dispatcher.domain import decisions
from dispatcher.eventlog.filelog import FileLog
from dispatcher.journal import Journal
from dispatcher.poller import Poller


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
    nodes, processes = servers.start_nodes(nats_url)
    try:
        http_port, dispatcher = servers.start_get_tcp_ip(tmp_path, nats_url, nodes,
                                                         workers=workers, fast_path=True,
                                                         interval=interval)
    except BaseException:
        stop(*processes)
        raise
    return http_port, dispatcher, processes


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


ROUNDS = 3  # interleaved rounds per server; each one's median is kept
SECONDS = 2  # per wrk run


@pytest.mark.skipif(wrk.WRK is None, reason="wrk not installed: apt-get install wrk")
@pytest.mark.parametrize("workers", [1, 2])
def test_get_tcp_ip_side_by_side(request, benchmark, tmp_path, nats_url, workers):
    """get-tcp-ip with the fast path and with the plain Sanic route, a bare Sanic route and
    nginx (when installed) answering the same request on the same machine, with `workers`
    workers each: kept-alive connections, and with 1 worker one request per connection."""
    benchmark.group = "dispatcher HTTP"
    nodes, processes = servers.start_nodes(nats_url)
    ports = {}
    try:
        for server, fast_path in ((targets.FAST, True), (targets.PLAIN, False)):
            ports[server], process = servers.start_get_tcp_ip(
                tmp_path, nats_url, nodes, workers=workers, fast_path=fast_path)
            processes.append(process)
        ports[targets.BARE], process = servers.start_bare_sanic(workers)
        processes.append(process)
        if servers.nginx_binary() is None:
            targets.SKIPPED.append((f"{request.node.nodeid}: nginx",
                                    "nginx not installed: apt-get install nginx"))
        else:
            ports[targets.NGINX], process = servers.start_nginx(tmp_path, workers)
            processes.append(process)
        scenarios = {f"keep-alive, {workers} worker{'s' * (workers > 1)}": False}
        if workers == 1:
            scenarios["Connection: close, 1 worker"] = True
        measured = benchmark.pedantic(
            lambda: {scenario: side_by_side(ports, workers, close)
                     for scenario, close in scenarios.items()}, rounds=1, iterations=1)
    finally:
        stop(*processes)
    for scenario, runs in measured.items():
        record_http(scenario, runs, benchmark, scenarios[scenario], workers)
    for scenario, runs in measured.items():
        answers = {server: run.non_2xx for server, run in runs.items()}
        assert not any(answers.values()), f"{scenario}: non-2xx answers {answers}"


@dataclass(frozen=True)
class Median:
    rate: float  # requests per second, the median of the rounds
    p99_ms: float  # the median of the rounds' p99
    non_2xx: int  # over all rounds
    errors: int  # wrk's socket errors, over all rounds
    rates: list[float]
    percentiles: list[tuple[float, float]]  # of the round with the median rate


def wrk_options(workers: int, close: bool) -> dict[str, object]:
    """One wrk thread per server worker: with 1 worker, wrk and the server each have one
    of a 2-core machine's cores."""
    return {"threads": workers, "connections": 64, "close": close}


def side_by_side(ports: dict[str, int], workers: int, close: bool) -> dict[str, Median]:
    """Every server in turn, `ROUNDS` times (drift on a shared machine hits all alike)."""
    urls = {server: f"http://127.0.0.1:{port}{servers.REQUEST}"
            for server, port in ports.items()}
    options = wrk_options(workers, close)
    for url in urls.values():
        wrk.run(url, 1, **options)  # warm up
    runs = {server: [] for server in urls}
    for _ in range(ROUNDS):
        for server, url in urls.items():
            runs[server].append(wrk.run(url, SECONDS, **options))
    medians = {}
    for server, rounds in runs.items():
        by_rate = sorted(rounds, key=lambda run: run.rate)
        middle = by_rate[len(by_rate) // 2]
        medians[server] = Median(middle.rate, sorted(r.p99_ms for r in rounds)[len(rounds) // 2],
                                 sum(r.non_2xx for r in rounds), sum(r.errors for r in rounds),
                                 [r.rate for r in rounds], middle.percentiles)
    return medians


def record_http(scenario: str, runs: dict[str, Median], benchmark, close: bool,
                workers: int) -> None:
    """Figures (the targets read the ratios) and the report's side-by-side table."""
    def name(what):
        return targets.http(scenario, what)

    for server, run in runs.items():
        targets.figure(name(f"{server}: requests/s"), run.rate, "req/s", benchmark)
        targets.figure(name(f"{server}: p99"), run.p99_ms, "ms", benchmark)
        if server != targets.BARE:
            targets.figure(name(f"{server} / {targets.BARE}"),
                           run.rate / runs[targets.BARE].rate, "x", benchmark)
    fast = runs[targets.FAST]
    targets.figure(name(f"{targets.FAST} p99 / {targets.BARE} p99"),
                   fast.p99_ms / runs[targets.BARE].p99_ms, "x", benchmark)
    targets.figure(name(f"{targets.FAST} / {targets.PLAIN}"),
                   fast.rate / runs[targets.PLAIN].rate, "x", benchmark)
    if targets.NGINX in runs:
        targets.figure(name(f"{targets.FAST} / {targets.NGINX}"),
                       fast.rate / runs[targets.NGINX].rate, "x", benchmark)
    targets.series(f"http: {scenario}", {
        "wrk": f"{wrk.describe(SECONDS, **wrk_options(workers, close))}, {ROUNDS} "
               "interleaved rounds, medians",
        "servers": {server: {"rate": run.rate, "p99_ms": run.p99_ms, "non_2xx": run.non_2xx,
                             "errors": run.errors, "rates": run.rates}
                    for server, run in runs.items()}})
    targets.series(f"latency percentiles, {scenario}",
                   {server: run.percentiles for server, run in runs.items()})
