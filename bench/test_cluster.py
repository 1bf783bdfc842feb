"""Cluster mode (issue 15): how long the replicas go without a leader's poll cycle after
the leader replica is SIGKILLed, how long a replica takes to join a 1,000,000-event
stream (from a snapshot kept beside it, and folding all of it), and what one replica
answers of get-tcp-ip with the JetStream backend next to the file backend."""

import asyncio
import os
import random
import statistics
import time
import urllib.request
from pathlib import Path

import nats
import orjson
import pytest

from bench import servers, targets, wrk
from bench.processes import dispatcher_config, serve, stop
from bench.stream_fill import StreamFiller
from bench.test_dispatcher import SECONDS, wrk_options
from dispatcher import config as cfg
from dispatcher.cluster.snapshots import BUCKET_SUFFIX
from dispatcher.demo.nats_cluster import NatsCluster
from dispatcher.domain import decisions
from dispatcher.domain import events as ev
from tests.test_cluster_mode import Replicas, kill_replica

POLL_INTERVAL = targets.FAILOVER_POLL
FAILOVER_ROUNDS = 6
JOIN_EVENTS = 1_000_000
JOIN_TAIL = cfg.EventLogConfig.snapshot_every - 1  # the most a leader leaves unsnapshotted
HTTP_ROUNDS = 5  # interleaved wrk rounds per backend (the median is kept)
JETSTREAM, FILE = targets.JETSTREAM_BACKEND, targets.FILE_BACKEND


def join_figure(snapshot: bool, what: str) -> str:
    """`targets.JOIN_SERVES` is `join_figure(True, "get-tcp-ip 200")`."""
    how = "from a snapshot" if snapshot else "without a snapshot (full fold)"
    return f"join 1M events {how}: start to {what}"


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory):
    with NatsCluster(tmp_path_factory.mktemp("natscluster")) as running:
        yield running


# -- failover -------------------------------------------------------------------------


def first_cycle_after(running: Replicas, killed: float, dead: int) -> float:
    """Seconds from `killed` to the end of the first full poll cycle of a new leader:
    a replica whose readiness says it leads, its last cycle ending after the kill (the
    end is the answer's time less its `last_poll_age_s`, so asking every 20 ms is
    precise to the answer's latency, not to the asking)."""
    deadline = killed + 30
    while time.monotonic() < deadline:
        for index, process in enumerate(running.replicas):
            if index == dead or process is None:
                continue
            try:
                details = running.ready(index)
            except OSError:
                continue
            seen, age = time.monotonic(), details.get("last_poll_age_s")
            if details.get("role") == "leader" and age is not None and seen - age > killed:
                return seen - age - killed
        time.sleep(0.02)
    raise AssertionError("no replica led with a fresh poll cycle within 30 s")


@pytest.mark.parametrize("lease", targets.FAILOVER_LEASES)
def test_failover_after_the_leader_replica_is_killed(benchmark, tmp_path, nats_cluster,
                                                    lease):
    """Three replicas (one worker each) on an R3 stream of a three-server cluster; each
    round SIGKILLs the leader replica's process group at a random moment, times the
    next leader's first poll cycle, and starts the dead replica again."""
    benchmark.group = "cluster mode"
    running = Replicas(tmp_path, nats_cluster, workers=(1, 1, 1), stream=f"BENCHFO{lease:g}",
                       lease=lease, poll=f"[poll]\ninterval = {POLL_INTERVAL}\n"
                                         f"timeout = {POLL_INTERVAL / 2}\n")
    times = []

    def rounds():
        for _ in range(FAILOVER_ROUNDS):
            old, _ = running.leader()
            time.sleep(random.uniform(0.0, POLL_INTERVAL))  # not in step with a cycle
            killed = time.monotonic()
            kill_replica(running, old)
            times.append(first_cycle_after(running, killed, old))
            running.replicas[old] = running.start_replica(old)
            running.wait_ready(old)

    try:
        benchmark.pedantic(rounds, rounds=1, iterations=1)
    finally:
        running.stop()
    benchmark.extra_info["failover_s"] = [round(t, 3) for t in times]
    targets.figure(targets.failover(lease, "median"), statistics.median(times), "s",
                   benchmark)
    targets.figure(targets.failover(lease, "longest"), max(times), "s", benchmark)


# -- joining a long history -----------------------------------------------------------


async def fill_history(url: str, stream: str, config_path) -> tuple[int, int]:
    """The history a long-lived cluster of the config's nodes has: its configuration
    recorded, the nodes up, then load reports; a snapshot kept `JOIN_TAIL` events before
    the end. (snapshot seq, last seq)."""
    config = cfg.load(config_path)
    async with StreamFiller(url, stream) as filler:
        await filler.record(decisions.reconcile_config(filler.state, config.recorded(),
                                                       config.source))
        nodes = sorted(filler.state.nodes)
        await filler.record([ev.NodeUp(node=node, actor="poller") for node in nodes])
        await filler.loads(JOIN_EVENTS - JOIN_TAIL - filler.state.seq, nodes)
        snapshot = filler.snapshot()
        await filler.keep(snapshot)
        await filler.loads(JOIN_TAIL, nodes)
        await filler.settle()
        return snapshot.seq, filler.state.seq


async def drop_snapshots(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream(timeout=10).delete_object_store(stream + BUCKET_SUFFIX)
    finally:
        await nc.close()


def answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:  # not listening yet, or 503 (urllib's HTTPError is an OSError)
        return False


def join(config_path, port: int, log, timeout: float) -> dict[str, float]:
    """Start a replica; seconds from its start to its first get-tcp-ip 200 and to
    /readyz 200 (each asked every 20 ms). Stopped cleanly after (its lease released)."""
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    process = serve(config_path, log)
    found: dict[str, float] = {}
    try:
        while len(found) < 2:
            assert process.poll() is None, f"the replica exited: {log.read_text()[-3000:]}"
            assert time.monotonic() - started < timeout, (
                f"no answer in {timeout} s: {found}\n{log.read_text()[-3000:]}")
            for what, path in (("get-tcp-ip 200", servers.REQUEST), ("/readyz 200", "/readyz")):
                if what not in found and answers_200(base + path):
                    found[what] = time.monotonic() - started
            time.sleep(0.02)
    finally:
        stop(process)
    return found


def test_join_a_million_event_stream(benchmark, tmp_path, nats_url):
    """One replica starting on a stream of 1M events (one nats-server, R1: the fold reads
    from the stream's leader either way), first with the newest snapshot `JOIN_TAIL`
    events before the end, then with no snapshot at all."""
    benchmark.group = "cluster mode"
    stream = "BENCHJOIN"
    nodes, imnodes = servers.start_nodes(nats_url)
    try:
        port, config_path = dispatcher_config(
            tmp_path, nats_url, nodes, balance="slow_start = 0\n",
            eventlog=f'backend = "jetstream"\nstream = "{stream}"\nlease = 2.0\n')
        filled = time.monotonic()
        snapshot_seq, last_seq = asyncio.run(fill_history(nats_url, stream, config_path))
        benchmark.extra_info["fill_s"] = round(time.monotonic() - filled, 2)
        assert last_seq == JOIN_EVENTS

        def measure():
            with_snapshot = join(config_path, port, tmp_path / "snapshot.log", 30)
            asyncio.run(drop_snapshots(nats_url, stream))
            full = join(config_path, port, tmp_path / "full.log", 120)
            return with_snapshot, full

        with_snapshot, full = benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        stop(*imnodes)
    assert f"from snapshot at seq {snapshot_seq} plus" in (tmp_path / "snapshot.log").read_text()
    assert "from an empty state plus" in (tmp_path / "full.log").read_text()
    for snapshot, found in ((True, with_snapshot), (False, full)):
        for what, seconds in found.items():
            targets.figure(join_figure(snapshot, what), seconds, "s", benchmark)


# -- get-tcp-ip per replica -----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children (a `serve` and its worker)."""
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    ticks = 0
    for one in pids:
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def interleaved(servers_: dict[str, tuple[int, int]], close: bool) -> dict[str, list[tuple]]:
    """`HTTP_ROUNDS` rounds of one wrk run per server ({name: (port, pid)}), the order
    swapped every round: per server, (requests/s, server CPU us per request, non-2xx)
    of each round. A neighbour's burst on a shared machine takes CPU from whichever
    server runs then; the CPU a request costs the server is what it does not hide."""
    options = wrk_options(1, close)
    for port, _ in servers_.values():
        wrk.run(f"http://127.0.0.1:{port}{servers.REQUEST}", 1, **options)  # warm up
    runs: dict[str, list[tuple]] = {server: [] for server in servers_}
    for round_ in range(HTTP_ROUNDS):
        for server in sorted(servers_, reverse=bool(round_ % 2)):
            port, pid = servers_[server]
            before = cpu_seconds(pid)
            run = wrk.run(f"http://127.0.0.1:{port}{servers.REQUEST}", SECONDS, **options)
            used = cpu_seconds(pid) - before
            runs[server].append((run.rate, used / (run.rate * SECONDS) * 1e6, run.non_2xx))
    return runs


@pytest.mark.skipif(wrk.WRK is None, reason="wrk not installed: apt-get install wrk")
def test_get_tcp_ip_jetstream_vs_file_backend(benchmark, tmp_path, nats_cluster):
    """One replica with 1 worker, the same config but for `[eventlog] backend` (an R3
    stream on the three-server cluster, or a file log), wrk on loopback in interleaved
    rounds: kept-alive connections and one request per connection. The ratios are the
    medians of the rounds' ratios (each round runs the two back to back)."""
    benchmark.group = "cluster mode"
    url = nats_cluster.urls[0]
    nodes, processes = servers.start_nodes(url)
    running = {}
    try:
        for server, directory, eventlog in (
                (JETSTREAM, "jetstream",
                 'backend = "jetstream"\nstream = "BENCHHTTP"\nreplicas = 3\n'),
                (FILE, "file", None)):
            port, process = servers.start_get_tcp_ip(
                tmp_path / directory, url, nodes, workers=1, fast_path=True,
                eventlog=eventlog)
            processes.append(process)
            running[server] = port, process.pid
        roles = {server: orjson.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/readyz", timeout=5).read())
            for server, (port, _) in running.items()}
        assert "member" in roles[JETSTREAM] and "member" not in roles[FILE], roles
        scenarios = {"keep-alive, 1 worker": False, "Connection: close, 1 worker": True}
        measured = benchmark.pedantic(
            lambda: {scenario: interleaved(running, close)
                     for scenario, close in scenarios.items()}, rounds=1, iterations=1)
    finally:
        stop(*processes)
    for scenario, runs in measured.items():
        for server, rounds in runs.items():
            targets.figure(targets.per_replica(scenario, f"{server}: requests/s"),
                           statistics.median(rate for rate, _, _ in rounds), "req/s",
                           benchmark)
            targets.figure(targets.per_replica(scenario, f"{server}: server CPU per request"),
                           statistics.median(cpu for _, cpu, _ in rounds), "us", benchmark)
            benchmark.extra_info[f"{scenario}: {server}: rounds (req/s, CPU us/request)"] = [
                (round(rate), round(cpu, 2)) for rate, cpu, _ in rounds]
        pairs = list(zip(runs[JETSTREAM], runs[FILE], strict=True))
        targets.figure(targets.per_replica(scenario, f"{JETSTREAM} / {FILE}"),
                       statistics.median(js[0] / file[0] for js, file in pairs), "x",
                       benchmark)
        targets.figure(targets.per_replica(scenario, f"CPU per request, {JETSTREAM} / {FILE}"),
                       statistics.median(js[1] / file[1] for js, file in pairs), "x",
                       benchmark)
        benchmark.extra_info[f"{scenario}: wrk"] = (
            f"{wrk.describe(SECONDS, **wrk_options(1, scenarios[scenario]))}, {HTTP_ROUNDS} "
            "interleaved rounds")
        non_2xx = {server: sum(r[2] for r in rounds) for server, rounds in runs.items()}
        assert not any(non_2xx.values()), f"{scenario}: non-2xx answers {non_2xx}"
