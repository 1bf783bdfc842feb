"""JetStream event log throughput against a local nats-server (file storage, 1 replica).

Each case runs once (`rounds=1`): the figure of interest is events per second over N
events, recorded in `benchmark.extra_info["events_per_s"]` and printed (`-s` shows it).
"""

import asyncio
import itertools
import time

import nats
import pytest

from bench import targets
from dispatcher.domain import decisions
from dispatcher.eventlog.jetstream import JetStreamLog
from dispatcher.journal import Journal
from tests.nats_server import NatsServer

N = 20_000
_streams = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with NatsServer(tmp_path_factory.mktemp("nats") / "js") as running:
        yield running


def fresh_stream() -> dict:
    n = next(_streams)
    return {"stream": f"BENCH_{n}", "subject": f"imdbench.{n}.events"}


def connected(url, body):
    async def main():
        nc = await nats.connect(url)
        try:
            return await body(nc)
        finally:
            await nc.close()

    return asyncio.run(main())


async def record_weight_changes(journal: Journal, count: int, *, pipelined: bool) -> float:
    """Record `count` one-event changes; return the seconds they took to be acknowledged.

    Pipelined: every change is recorded at once and awaited together (many callers, as
    poller and admin API produce them); otherwise each waits for its ack (latency bound).
    """
    state = journal.state
    if "n1" not in state.nodes:
        await journal.record(decisions.add_node(state, "n1", "10.0.0.1", 9001, 5, actor="b"))
    started = time.perf_counter()
    if pipelined:
        await asyncio.gather(*(
            journal.record(decisions.set_weight(state, "n1", 1 + i % 2, actor="bench"))
            for i in range(count)
        ))
    else:
        for i in range(count):
            await journal.record(decisions.set_weight(state, "n1", 1 + i % 2, actor="bench"))
    return time.perf_counter() - started


def report(benchmark, case: str, count: int, seconds: float) -> None:
    benchmark.extra_info.update(events=count, seconds=round(seconds, 3))
    targets.figure(f"jetstream {case}", count / seconds, "events/s", benchmark)


@pytest.mark.parametrize(("pipelined", "count"), [(True, N), (False, N // 10)],
                         ids=["pipelined", "one-at-a-time"])
def test_append_throughput(benchmark, server, pipelined, count):
    benchmark.group = "jetstream event log"

    def append():
        async def body(nc):
            journal = Journal(JetStreamLog(nc, **fresh_stream()))
            await journal.open()
            seconds = await record_weight_changes(journal, count, pipelined=pipelined)
            await journal.close()
            assert journal.state.seq == count + 1
            return seconds

        return connected(server.url, body)

    seconds = benchmark.pedantic(append, rounds=1, iterations=1)
    report(benchmark, f"append ({'pipelined' if pipelined else 'one at a time'})", count, seconds)


def test_replay_throughput(benchmark, server):
    benchmark.group = "jetstream event log"
    where = fresh_stream()

    async def fill(nc):
        journal = Journal(JetStreamLog(nc, **where))
        await journal.open()
        await record_weight_changes(journal, N, pipelined=True)
        await journal.close()
        return journal.state.to_dict()

    written = connected(server.url, fill)

    def replay():
        async def body(nc):
            journal = Journal(JetStreamLog(nc, **where))
            started = time.perf_counter()
            start = await journal.open()
            seconds = time.perf_counter() - started
            assert start.replayed == N + 1 and journal.state.to_dict() == written
            await journal.close()
            return seconds

        return connected(server.url, body)

    seconds = benchmark.pedantic(replay, rounds=1, iterations=1)
    report(benchmark, "replay (journal open)", N + 1, seconds)
