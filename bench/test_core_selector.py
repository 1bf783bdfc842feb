"""Micro benchmarks of the selection core, compiled vs reference in the same group."""

import pytest

from bench import targets
from core_ext.implementations import IMPLEMENTATIONS


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def implementation(request):
    return request.param


def loaded_selector(implementation: str, nodes: int):
    """Nodes of mixed weights and loads, as a live dispatcher has them after a poll."""
    selector = IMPLEMENTATIONS[implementation]()
    for i in range(nodes):
        nid = f"node-{i:04d}"
        selector.add(nid, 1 + i % 7)
        # Capacity so large that no node overloads during millions of benchmark picks.
        selector.report(nid, connections=(i * 7919) % 400_000_000, capacity=1_000_000_000)
    return selector


@pytest.mark.parametrize("nodes", [8, 64, 1024])
def test_pick(benchmark, implementation, nodes):
    case = f"pick, {nodes} nodes"
    benchmark.group = case
    selector = loaded_selector(implementation, nodes)
    assert benchmark(selector.pick) is not None
    targets.record(case, implementation, benchmark)


def test_pick_with_share(benchmark, implementation):
    """A cluster member taking 1/3 of the headroom: each pick counts 3 in the ledger, at
    the same cost as 1."""
    case = "pick, 8 nodes, share 3"
    benchmark.group = case
    selector = loaded_selector(implementation, 8)
    selector.set_share(3)
    assert benchmark(selector.pick) is not None
    assert selector.node("node-0000")["pending"] % 3 == 0
    targets.record(case, implementation, benchmark)


@pytest.mark.parametrize("nodes", [64])
def test_pick_with_exclude(benchmark, implementation, nodes):
    case = f"pick excluding 2, {nodes} nodes"
    benchmark.group = case
    selector = loaded_selector(implementation, nodes)
    exclude = ("node-0003", "node-0010")
    assert benchmark(selector.pick, exclude) not in exclude
    targets.record(case, implementation, benchmark)


@pytest.mark.parametrize("nodes", [8, 64, 1024])
def test_report(benchmark, implementation, nodes):
    case = f"report, {nodes} nodes"
    benchmark.group = case
    selector = loaded_selector(implementation, nodes)
    benchmark(selector.report, "node-0005", 123_456, 1_000_000)
    assert selector.node("node-0005")["connections"] == 123_456
    targets.record(case, implementation, benchmark)
