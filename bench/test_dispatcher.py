"""The dispatcher: poll cycle time at 10/100/1000 nodes, failure detection after SIGKILL,
and HTTP throughput of /get-tcp-ip against a bare Sanic route (wrk, 1 and 2 workers)."""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from bench import targets
from dispatcher import config as cfg
from dispatcher.domain import decisions
from dispatcher.eventlog.filelog import FileLog
from dispatcher.journal import Journal
from dispatcher.poller import Poller
from tests.nats_server import NatsServer, free_port


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory):
    with NatsServer(tmp_path_factory.mktemp("nats") / "js") as server:
        yield server.url


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


def start(argv, env=None):
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def stop(*processes):
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(url, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered 200")


def cluster(tmp_path, nats_url, workers, interval=0.5):
    ports = {f"b{i}": free_port() for i in range(3)}
    nodes = []
    for node_id, port in ports.items():
        process = start([sys.executable, "-m", "imnode", "serve", "--id", node_id, "--listen",
                         f"127.0.0.1:{port}", "--nats", nats_url, "--capacity", "100000",
                         "--log-level", "warning"])
        assert process.stdout.readline().startswith("imnode")
        nodes.append(process)
    http_port = free_port()
    config = tmp_path / f"dispatcher-{workers}.toml"
    config.write_text(
        f"[http]\nport = {http_port}\nworkers = {workers}\n"
        f'[nats]\nservers = ["{nats_url}"]\n'
        f"[poll]\ninterval = {interval}\ntimeout = {interval / 2}\nrise = 1\n"
        "[balance]\nslow_start = 0\nassign_rate = 1000000000\n"
        f'[eventlog]\npath = "{tmp_path / f"events-{workers}"}"\n'
        + "".join(f'[[nodes]]\nid = "{n}"\nip = "127.0.0.1"\nport = {p}\nweight = {i + 1}\n'
                  for i, (n, p) in enumerate(ports.items())))
    dispatcher = start([sys.executable, "-m", "dispatcher", "serve", "--config", str(config),
                        "--log-level", "warning"], {"IMDISPATCH_ADMIN_TOKEN": "bench"})
    assert dispatcher.stdout.readline().startswith("imdispatch serving")
    wait_ready(f"http://127.0.0.1:{http_port}/readyz")
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
                time.sleep(0.01)
            return time.monotonic() - killed

        seconds = benchmark.pedantic(detect, rounds=1, iterations=1)
    finally:
        stop(dispatcher, *nodes)
    targets.figure("failure detection after SIGKILL (poll interval 1 s)", seconds, "s",
                   benchmark)


WRK = shutil.which("wrk")


def wrk(url, seconds=5):
    result = subprocess.run([WRK, "-t2", "-c64", f"-d{seconds}s", "--latency", url],
                            capture_output=True, text=True, timeout=seconds + 30, check=True)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", result.stdout)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    return rate, float(p99.group(1)) * scale, int(non_2xx.group(1)) if non_2xx else 0


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
            return sorted(ours)[1], sorted(theirs)[1], sum(run[2] for run in ours)

        (rate, p99, _), (bare_rate, bare_p99, _), errors = benchmark.pedantic(
            measure, rounds=1, iterations=1)
    finally:
        stop(bare, dispatcher, *nodes)
    assert errors == 0, f"{errors} non-2xx answers"
    name = f"get-tcp-ip, {workers} worker(s)"
    targets.figure(f"{name}: requests/s", rate, "req/s", benchmark)
    targets.figure(f"bare Sanic, {workers} worker(s): requests/s", bare_rate, "req/s", benchmark)
    targets.figure(f"{name}: p99 / bare p99", p99 / bare_p99, "x", benchmark)
    targets.figure(f"{name}: throughput / bare", rate / bare_rate, "x", benchmark)
