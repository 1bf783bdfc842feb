"""imnode: idle connection capacity (RSS per connection, heartbeat CPU) and message round
trips on one node and across two nodes over NATS. Loopback only; each scenario bounded."""

import asyncio
import os
import statistics
import subprocess
import sys
import time

import nats
import orjson
import pytest

from bench import targets
from bench.processes import start_imnode, stop
from imnode.client import ImClient
from tests.nats_server import free_port

CONNECTIONS = 10_000
HEARTBEAT = 5.0  # seconds between pings per client: 2,000 pings/s at 10k clients


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_node(node_id: str, port: int, nats_url: str, capacity: int) -> subprocess.Popen:
    return start_imnode(node_id, port, nats_url, capacity, "--heartbeat-interval",
                        str(HEARTBEAT))


def test_idle_connections_with_heartbeats(benchmark, nats_url):
    benchmark.group = "imnode"
    port = free_port()
    node = start_node("bench1", port, nats_url, CONNECTIONS + 100)
    try:
        time.sleep(1.0)  # NATS link and micro service up
        baseline = rss_kib(node.pid)
        swarm = subprocess.Popen(
            [sys.executable, "-m", "bench.client_swarm", "127.0.0.1", str(port),
             str(CONNECTIONS), str(HEARTBEAT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            def connect():
                line = swarm.stdout.readline()
                assert line.strip() == f"ready {CONNECTIONS}", line
            benchmark.pedantic(connect, rounds=1, iterations=1)
            time.sleep(2.0)  # every uid's NATS subscription is in place
            per_connection = (rss_kib(node.pid) - baseline) * 1024 / CONNECTIONS
            cpu_before, wall_before = cpu_seconds(node.pid), time.monotonic()
            time.sleep(3 * HEARTBEAT)  # three heartbeat rounds
            cpu = (cpu_seconds(node.pid) - cpu_before) / (time.monotonic() - wall_before)
            status_ms, status = asyncio.run(status_round_trips(nats_url, "bench1", 500))
        finally:
            swarm.stdin.close()
            swarm.wait(timeout=60)
    finally:
        stop(node)
    # What the node itself reports after the heartbeat rounds: every client still there.
    targets.figure("imnode idle connections", status["sessions"], "connections", benchmark)
    targets.figure("imnode RSS per idle connection", per_connection, "bytes", benchmark)
    targets.figure(f"imnode CPU for heartbeats ({CONNECTIONS // HEARTBEAT:.0f}/s)",
                   cpu * 100, "% of a core", benchmark)
    cuts = statistics.quantiles(status_ms, n=100)
    targets.figure("imnode status request p50 at 10k connections", cuts[49], "ms", benchmark)
    targets.figure("imnode status request p99 at 10k connections", cuts[98], "ms", benchmark)


async def status_round_trips(url: str, node_id: str, count: int) -> list[float]:
    """Status requests over NATS, as the dispatcher's poller makes them (milliseconds)."""
    nc = await nats.connect(url)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        reply = await nc.request(f"imnode.{node_id}.status", b"", timeout=2)
        times.append((time.perf_counter() - started) * 1000)
    await nc.close()
    return times, orjson.loads(reply.data)


async def round_trips(alice: ImClient, bob: ImClient, count: int) -> list[float]:
    """alice -> bob -> alice echo times, in milliseconds."""
    async def echo():
        while True:
            message = await bob.receive()
            await bob.send(message["from"], message["body"])

    echoer = asyncio.get_running_loop().create_task(echo())
    times = []
    for i in range(count):
        started = time.perf_counter()
        await alice.send(bob.uid, i)
        assert (await alice.receive(timeout=5))["body"] == i
        times.append((time.perf_counter() - started) * 1000)
    echoer.cancel()
    return times


@pytest.mark.parametrize("across", [False, True], ids=["one-node", "two-nodes"])
def test_message_round_trip(benchmark, nats_url, across):
    benchmark.group = "imnode"
    ports = [free_port(), free_port()]
    nodes = [start_node(f"rt{i}", port, nats_url, 100) for i, port in enumerate(ports)]
    try:
        async def body():
            alice, bob = ImClient("rt-alice"), ImClient("rt-bob")
            await alice.connect(("127.0.0.1", ports[0]))
            await bob.connect(("127.0.0.1", ports[1] if across else ports[0]))
            await asyncio.sleep(1.0)
            await round_trips(alice, bob, 100)  # warm up
            times = await round_trips(alice, bob, 2000)
            await alice.close()
            await bob.close()
            return times

        times = benchmark.pedantic(lambda: asyncio.run(body()), rounds=1, iterations=1)
    finally:
        for node in nodes:
            stop(node)
    where = "two nodes" if across else "one node"
    cuts = statistics.quantiles(times, n=100)
    targets.figure(f"imnode round trip p50, {where}", cuts[49], "ms", benchmark)
    targets.figure(f"imnode round trip p99, {where}", cuts[98], "ms", benchmark)
