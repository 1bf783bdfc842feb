"""The NATS cluster that cluster mode (issue 15) will stand on: how long three servers take
to have JetStream ready, and how long writes to an R3 stream stop when the server leading
it is SIGKILLed (the floor under any failover of ours that writes to the stream)."""

import asyncio
import statistics
import time

import nats
from nats.errors import Error as NatsError

from bench import targets
from dispatcher.demo.nats_cluster import NatsCluster

RUNS = 3


async def _quiet(_exc: Exception) -> None:
    """The client's reconnect chatter while a member is down is expected here."""


async def _writes_stopped(cluster: NatsCluster, run: int) -> float:
    """Seconds from SIGKILL of the stream leader's server to the next acknowledged
    publish, retried every 20 ms with a 0.5 s timeout."""
    nc = await nats.connect(cluster.urls, error_cb=_quiet)
    try:
        js = nc.jetstream(timeout=2)
        stream = f"FAILOVER{run}"
        await js.add_stream(name=stream, subjects=[stream.lower()], num_replicas=3)
        for i in range(20):
            await js.publish(stream.lower(), b"x", headers={"Nats-Msg-Id": str(i)})
        leader = (await js.stream_info(stream)).cluster.leader
        started = time.monotonic()
        cluster.kill(cluster.index_of(leader))
        while True:
            try:
                ack = await js.publish(stream.lower(), b"y", timeout=0.5,
                                       headers={"Nats-Msg-Id": "after"})
                break
            except NatsError:
                await asyncio.sleep(0.02)
        stopped = time.monotonic() - started
        assert ack.seq == 21  # nothing acknowledged was lost, nothing stored twice
        return stopped
    finally:
        await nc.close()


def test_stream_leader_sigkill(benchmark, tmp_path):
    benchmark.group = "NATS cluster"
    starts, gaps = [], []

    def measure():
        for run in range(RUNS):
            started = time.monotonic()
            with NatsCluster(tmp_path / f"run{run}") as cluster:
                starts.append(time.monotonic() - started)
                gaps.append(asyncio.run(_writes_stopped(cluster, run)))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    targets.figure("NATS cluster of 3: start to JetStream ready (median)",
                   statistics.median(starts), "s", benchmark)
    targets.figure("R3 stream leader SIGKILL: writes stopped for (median of 3)",
                   statistics.median(gaps), "s", benchmark)
    targets.figure("R3 stream leader SIGKILL: writes stopped for (longest of 3)",
                   max(gaps), "s", benchmark)
