"""Reconnect storm: a node holding K clients dies (SIGKILL) and all K ask the dispatcher
where to go at once. How fast do they get back, how do they spread over the survivors
(against their weights), how many does each survivor take per second, and does any
survivor cross its high watermark? Loopback only; bounded by the swarm's own timeout."""

import json
import os
import sys
import urllib.request
from collections import Counter, defaultdict

from bench import targets
from bench.processes import start, start_dispatcher, start_imnode, stop
from tests.nats_server import free_port

CLIENTS = int(os.environ.get("BENCH_STORM_CLIENTS", "6000"))
SURVIVORS = {"s1": 3, "s2": 2, "s3": 1}  # weights; capacities twice their share of K
HIGH_WATERMARK = 0.9
BUCKET = 0.25  # seconds per point of the assignment plot


def admin_events(port):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/events?limit=1000",
                                     headers={"Authorization": "Bearer bench"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_reconnect_storm_spreads_by_weight_without_overloading(benchmark, tmp_path,
                                                                nats_url):
    benchmark.group = "reconnect storm"
    total = sum(SURVIVORS.values())
    capacity = {node: 2 * CLIENTS * weight // total for node, weight in SURVIVORS.items()}
    ports = {node: free_port() for node in ("victim", *SURVIVORS)}
    running = []  # stopped whatever happens, even if a later start fails
    try:
        nodes = {}
        for node, port in ports.items():
            nodes[node] = start_imnode(node, port, nats_url, capacity.get(node, CLIENTS + 100))
            running.append(nodes[node])
        http_port, dispatcher = start_dispatcher(
            tmp_path, nats_url, {n: (ports[n], SURVIVORS.get(n, 2)) for n in ports},
            balance=f"slow_start = 0\nhigh_watermark = {HIGH_WATERMARK}\n",
            http="retry_after = 1\n")
        running.append(dispatcher)
        swarm = start([sys.executable, "-m", "bench.storm_clients",
                       f"http://127.0.0.1:{http_port}", "127.0.0.1", str(ports["victim"]),
                       str(CLIENTS), "60"])
        running.insert(0, swarm)
        assert swarm.stdout.readline().strip() == f"ready {CLIENTS}"
        seq_before = max((e["seq"] for e in admin_events(http_port)), default=0)

        def storm():
            nodes["victim"].kill()
            nodes["victim"].wait()
            return json.loads(swarm.stdout.readline())

        result = benchmark.pedantic(storm, rounds=1, iterations=1)
        overloads = [e["node"] for e in admin_events(http_port)
                     if e["seq"] > seq_before and e["type"] == "node_overloaded"]
    finally:
        stop(*running)

    node_of = {f"127.0.0.1:{port}": node for node, port in ports.items()}
    placed = [(t, node_of[address]) for t, address in result["assignments"]]
    counts = Counter(node for _, node in placed)
    assert result["reconnected"] == CLIENTS, result["reconnected"]
    assert "victim" not in counts
    times = sorted(t for t, _ in placed)
    targets.figure("storm: clients of the dead node", CLIENTS, "clients", benchmark)
    targets.figure("storm: all re-dispatched after", times[-1], "s", benchmark)
    targets.figure("storm: half re-dispatched after", times[len(times) // 2], "s", benchmark)
    targets.figure("storm: 503 answers during the storm", len(result["refusals"]), "",
                   benchmark)
    targets.figure("storm: CPU of the client process / wall time, until all were back",
                   result["cpu_s"] / times[-1], "x", benchmark)
    deviation = 0.0
    for node, weight in SURVIVORS.items():
        share, expected = counts[node] / CLIENTS, weight / total
        deviation = max(deviation, abs(share - expected) / expected)
        targets.figure(f"storm: share of {node} (weight {weight}/{total})", share * 100, "%",
                       benchmark)
    targets.figure("storm: largest share deviation from the weights", deviation * 100, "%",
                   benchmark)
    per_second = defaultdict(Counter)
    for t, node in placed:
        per_second[node][int(t)] += 1
    for node in SURVIVORS:
        targets.figure(f"storm: peak assignments per second to {node} (cap "
                       f"{capacity[node] / 10:.0f}/s)", max(per_second[node].values()), "/s",
                       benchmark)
    over = [node for node in SURVIVORS
            if counts[node] > HIGH_WATERMARK * capacity[node]] + overloads
    targets.figure("storm: survivors over their high watermark", len(set(over)), "",
                   benchmark)
    buckets = int(times[-1] / BUCKET) + 2
    series = {node: [0] * buckets for node in SURVIVORS}
    for t, node in placed:
        series[node][int(t / BUCKET)] += 1
    targets.series("storm: assignments per node", {
        "bucket_s": BUCKET, "per_node": series, "weights": SURVIVORS,
        "refusals": result["refusals"]})
    assert deviation < 0.5, counts  # far off: something is broken, not merely slow
