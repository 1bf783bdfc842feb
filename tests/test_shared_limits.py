"""The watermark, the assignment cap and backups hold whatever the number of workers:
real `imdispatch serve` processes, real imnodes, real clients filling them through
get-tcp-ip (tests/filler.py)."""

import asyncio
import math
import os
import resource
import signal
import subprocess
import sys
from collections import Counter

import pytest

from tests.filler import fill
from tests.nats_server import free_port
from tests.test_dispatcher_e2e import WEIGHTS, Cluster

CAPACITY = 100


@pytest.mark.parametrize("workers", [1, 2])
def test_no_node_is_filled_past_its_watermark_whatever_the_workers(tmp_path, nats_server,
                                                                     workers):
    running = Cluster(tmp_path, nats_server.url, workers=workers, capacity=CAPACITY,
                      assign_rate=10_000)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        result = asyncio.run(fill(running.url(""), seconds=30))
        limit = math.ceil(0.9 * CAPACITY)
        assert result["refused"] > 0, result  # it did fill them up
        assert all(held <= limit for held in result["held"].values()), result
        assert sum(result["held"].values()) >= 3 * limit - 6, result  # and nearly to the top
        nodes = {n["id"]: n for n in running.admin("GET", "/admin/nodes")[2]}
        assert all(node["connections"] <= limit for node in nodes.values()), nodes
    finally:
        running.stop()


def test_the_assignment_cap_is_one_for_all_workers(tmp_path, nats_server):
    rate = 15
    running = Cluster(tmp_path, nats_server.url, workers=2, capacity=10_000,
                      assign_rate=rate)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        result = asyncio.run(fill(running.url(""), seconds=3))
        # each node: a second's burst plus a second's rate in any one-second window
        assert all(peak <= 2 * rate + 1 for peak in result["peak_per_second"].values()), result
        assert result["answered"] <= 3 * rate * (3 + 1) + 3, result
    finally:
        running.stop()


@pytest.mark.parametrize("count", [2, 3])
def test_backups_neither_skew_primaries_nor_spend_the_cap(tmp_path, nats_server, count):
    running = Cluster(tmp_path, nats_server.url, assign_rate=100)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        primaries = Counter()
        for _ in range(120):  # 120 clients in well under a second: within every cap
            status, _, body = running.get(f"/get-tcp-ip?count={count}")
            assert status == 200, body
            primaries[body["node"]] += 1
            backups = [backup["node"] for backup in body["backups"]]
            assert len(backups) == count - 1 and body["node"] not in backups
        total = sum(WEIGHTS.values())
        assert primaries == {node: 120 * weight // total for node, weight in WEIGHTS.items()}
    finally:
        running.stop()


def test_the_leader_killed_mid_fill_reopens_no_places(tmp_path, nats_server):
    """kill -9 the leader worker once the nodes are half full, and go on filling: the
    worker taking over joins the ledger's counts instead of resetting them from its
    replayed state (which reopened the places taken since the last poll)."""
    running = Cluster(tmp_path, nats_server.url, workers=2, capacity=CAPACITY,
                      assign_rate=10_000)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        leader = int((tmp_path / "events" / "LOCK").read_text().split()[0])

        async def half_then_kill_then_full():
            clients: list = []  # the first half stays connected
            first = await fill(running.url(""), seconds=10, concurrency=2, keep=clients,
                               most=150)
            os.kill(leader, signal.SIGKILL)
            second = await fill(running.url(""), seconds=30)
            for writer in clients:
                writer.close()
            return first, second

        first, second = asyncio.run(half_then_kill_then_full())
        held = Counter(first["held"]) + Counter(second["held"])
        limit = math.ceil(0.9 * CAPACITY)
        assert 0 < sum(first["held"].values()) < 3 * limit, first  # killed mid-fill
        assert all(count <= limit for count in held.values()), (first, second)
        assert sum(held.values()) >= 3 * limit - 6, (first, second)
        assert int((tmp_path / "events" / "LOCK").read_text().split()[0]) != leader
    finally:
        running.stop()


def test_a_disk_too_full_for_the_ledger_stops_the_start_with_one_line(tmp_path):
    """The supervisor makes the workers' ledger (its blocks allocated) before any worker
    starts: no worker dies half-started, which made Sanic kill the caller's whole process
    group, and no pick can hit a SIGBUS later."""
    config = tmp_path / "dispatcher.toml"
    config.write_text(f'[http]\nport = {free_port()}\nworkers = 2\n'
                      f'[eventlog]\npath = "{tmp_path / "events"}"\n')

    def small_disk():  # in the child: files past 1 MiB cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = subprocess.run([sys.executable, "-m", "dispatcher", "serve", "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            preexec_fn=small_disk)
    assert result.returncode == 2, result.stderr
    assert "cannot make the workers' shared ledger" in result.stderr
    assert "File too large" in result.stderr and "Traceback" not in result.stderr
