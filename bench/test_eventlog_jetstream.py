"""JetStream event log throughput against a local nats-server (file storage, 1 replica).

Each case runs once (`rounds=1`): the figure of interest is events per second over N
events, recorded in `benchmark.extra_info["events_per_s"]` and printed (`-s` shows it).
Append and replay are measured at the log (as `bench/test_eventlog.py` measures the file
log) on a realistic stream (`bench.eventstream`); the journal cases add what a caller of
`Journal.record` pays on top (stamping, applying, an asyncio task per caller).
"""

import asyncio
import itertools
import time

import nats
import pytest

from bench import targets
from bench.eventstream import cluster_events, weight_changes
from dispatcher.domain import decisions
from dispatcher.eventlog.jetstream import JetStreamLog
from dispatcher.eventlog.records import Entry
from dispatcher.journal import Journal
from tests.nats_server import NatsServer

N = 20_000
REPLAY_N = 50_000
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


async def append_concurrently(log: JetStreamLog, entries: list[Entry]) -> float:
    """One event per append, all in flight at once (many writers, as the poller and the
    admin API produce them); the seconds until every one is acknowledged."""
    started = time.perf_counter()
    await asyncio.gather(*[log.append([entry]) for entry in entries])
    return time.perf_counter() - started


async def record_weight_changes(journal: Journal, count: int, *, pipelined: bool) -> float:
    """Record `count` one-event changes through the journal; the seconds they took to be
    acknowledged. Pipelined: every change recorded at once, one task per caller, awaited
    together; otherwise each waits for its ack (latency bound)."""
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


def test_append_pipelined(benchmark, server):
    benchmark.group = "jetstream event log"
    entries = [Entry.of(event) for event in cluster_events(N)]

    def append():
        async def body(nc):
            log = JetStreamLog(nc, **fresh_stream())
            await log.open()
            seconds = await append_concurrently(log, entries)
            await log.close()
            assert log.last_seq == N
            return seconds

        return connected(server.url, body)

    seconds = benchmark.pedantic(append, rounds=1, iterations=1)
    report(benchmark, "append (pipelined)", N, seconds)


@pytest.mark.parametrize(("pipelined", "count"), [(True, N), (False, N // 10)],
                         ids=["pipelined", "one-at-a-time"])
def test_journal_record(benchmark, server, pipelined, count):
    benchmark.group = "jetstream event log"

    def record():
        async def body(nc):
            journal = Journal(JetStreamLog(nc, **fresh_stream()))
            await journal.open()
            seconds = await record_weight_changes(journal, count, pipelined=pipelined)
            await journal.close()
            assert journal.state.seq == count + 1
            return seconds

        return connected(server.url, body)

    seconds = benchmark.pedantic(record, rounds=1, iterations=1)
    how = f"{count:,} concurrent callers" if pipelined else "one at a time"
    report(benchmark, f"journal.record ({how})", count, seconds)


STREAMS = {"weight changes": weight_changes, "cluster events": cluster_events}
"""Replayed streams: weight changes (the shape of the figures before the bulk reader:
a light fold) and a realistic cluster stream (mostly load reports: a heavier fold)."""


@pytest.fixture(scope="module", params=list(STREAMS))
def written(server, request):
    """A stream of REPLAY_N events, the state they fold into, and its name."""
    where = fresh_stream()

    async def fill(nc):
        log = JetStreamLog(nc, **where)
        await log.open()
        events = STREAMS[request.param](REPLAY_N)
        for i in range(0, REPLAY_N, 1000):
            log.append([Entry.of(event) for event in events[i:i + 1000]])
        await log.close()
        journal = Journal(JetStreamLog(nc, **where))
        await journal.open()
        await journal.log.close()
        return journal.state.to_dict()

    return where, connected(server.url, fill), request.param


def test_replay(benchmark, server, written):
    """Start-up from the stream: read, verify every record, apply every event."""
    benchmark.group = "jetstream event log"
    where, state, name = written

    def replay():
        async def body(nc):
            journal = Journal(JetStreamLog(nc, **where))
            started = time.perf_counter()
            start = await journal.open()
            seconds = time.perf_counter() - started
            assert start.replayed == REPLAY_N and journal.state.to_dict() == state
            await journal.log.close()
            return seconds

        return connected(server.url, body)

    seconds = benchmark.pedantic(replay, rounds=1, iterations=1)
    report(benchmark, f"replay (journal open), {name}", REPLAY_N, seconds)


def test_read(benchmark, server, written):
    """The log's part of a replay: read and verify every record, apply nothing."""
    benchmark.group = "jetstream event log"
    where, _, name = written

    def read():
        async def body(nc):
            log = JetStreamLog(nc, **where)
            started = time.perf_counter()
            count = sum([len(batch) async for batch in log.read()])
            seconds = time.perf_counter() - started
            assert count == REPLAY_N
            return seconds

        return connected(server.url, body)

    seconds = benchmark.pedantic(read, rounds=1, iterations=1)
    report(benchmark, f"read (verified records), {name}", REPLAY_N, seconds)
