"""The watermark and the assignment cap with 1, 2 and 4 workers: real clients fill three
real imnodes through `imdispatch serve` (tests/filler.py) until every node is full. No node
may hold more than ceil(high_watermark x capacity) clients, and no node may get more than
its cap plus a second's burst in any one second, whatever the number of workers. Also the
price of the shared counters in the selection core. Loopback only; bounded in time."""

import asyncio
import math

import pytest

from bench import targets
from bench.processes import start_dispatcher, start_imnode, stop
from bench.test_core_selector import loaded_selector
from core_ext.implementations import IMPLEMENTATIONS
from core_ext.ledger import Ledger
from tests.filler import fill
from tests.nats_server import free_port

NODES = {"f1": (3, 300), "f2": (2, 200), "f3": (1, 100)}  # weight, capacity
HIGH_WATERMARK = 0.9
RATE = 40  # clients a second per node: low enough that the cap shapes the fill


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def implementation(request):
    return request.param


def test_pick_with_the_shared_ledger(benchmark, implementation, tmp_path):
    case = "pick, 8 nodes, shared ledger + caps"
    benchmark.group = case
    selector = loaded_selector(implementation, 8)
    Ledger.create(tmp_path / "ledger")
    selector = type(selector).from_state(
        selector.state(), Ledger.shared(tmp_path / "ledger", reports=True))
    for node_id in selector.ids():
        selector.set_rate(node_id, 1e9)  # a cap on every node that never binds
    assert benchmark(selector.pick) is not None
    targets.record(case, implementation, benchmark)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_fill_holds_the_watermark_and_the_cap(benchmark, tmp_path, nats_url, workers):
    benchmark.group = "fill through get-tcp-ip"
    ports = {node: free_port() for node in NODES}
    running = []
    try:
        for node, (_, capacity) in NODES.items():
            running.append(start_imnode(node, ports[node], nats_url, capacity))
        http_port, dispatcher = start_dispatcher(
            tmp_path, nats_url, {n: (ports[n], weight) for n, (weight, _) in NODES.items()},
            workers=workers, interval=0.25,
            balance=f"slow_start = 0\nhigh_watermark = {HIGH_WATERMARK}\n"
                    f"assign_rate = {RATE}\n")
        running.append(dispatcher)
        result = benchmark.pedantic(
            lambda: asyncio.run(fill(f"http://127.0.0.1:{http_port}", 40)),
            rounds=1, iterations=1)
    finally:
        stop(*running)
    limits = {node: math.ceil(HIGH_WATERMARK * capacity) for node, (_, capacity) in
              NODES.items()}
    overshoot = max(result["held"].get(node, 0) - limit for node, limit in limits.items())
    peak = max(result["peak_per_second"].values())
    held = "/".join(str(result["held"].get(node, 0)) for node in NODES)
    print(f"\n{workers} worker(s): held {held} of {'/'.join(map(str, limits.values()))}, "
          f"peak {peak}/s per node (cap {RATE}/s + a second's burst), "
          f"{result['answered']} answered, {result['refused']} refused in {result['seconds']} s")
    targets.figure(f"fill, {workers} workers: clients past the watermark (most)", overshoot,
                   "clients", benchmark)
    targets.figure(f"fill, {workers} workers: peak assignments/s over cap + burst", peak /
                   (2 * RATE), "x", benchmark)
    targets.figure(f"fill, {workers} workers: seconds to fill", result["seconds"], "s")
    assert sum(result["held"].values()) >= sum(limits.values()) - 10, result  # it filled
