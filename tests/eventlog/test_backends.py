"""The same behaviour from every event log backend: file segments and JetStream."""

import asyncio
import contextlib
import itertools
import random

import nats
import pytest

from dispatcher.domain import decisions
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog.errors import LogLocked, StaleWriter
from dispatcher.eventlog.filelog import FileLog
from dispatcher.eventlog.jetstream import JetStreamLog
from dispatcher.journal import Journal

_streams = itertools.count()


class FileBackend:
    def __init__(self, path):
        self.path = path

    @contextlib.asynccontextmanager
    async def log(self):
        yield FileLog(self.path, fsync="batch")


class JetStreamBackend:
    def __init__(self, url):
        self.url = url
        self.stream = f"BACKENDS_{next(_streams)}"

    @contextlib.asynccontextmanager
    async def log(self):
        nc = await nats.connect(self.url)
        try:
            yield JetStreamLog(nc, stream=self.stream, subject=f"imdtest.{self.stream}")
        finally:
            await nc.close()


@pytest.fixture(params=["file", "jetstream"])
def backend(request, tmp_path):
    if request.param == "file":
        return FileBackend(tmp_path)
    return JetStreamBackend(request.getfixturevalue("nats_server").url)


def commands(seed, count):
    """A reproducible stream of operator and poller inputs over six nodes."""
    rng = random.Random(seed)
    nodes = [f"n{i}" for i in range(6)]
    for node in nodes:
        yield "add", node, rng.randint(1, 9)
    for _ in range(count):
        node = rng.choice(nodes)
        kind = rng.choice(["load", "load", "load", "up", "down", "weight", "drain"])
        yield (kind, node, rng.randint(0, 1200)) if kind == "load" else (kind, node, rng.random())


def decide(state, command):
    kind, node, value = command
    match kind:
        case "add":
            return decisions.add_node(state, node, "10.1.0.1", 9000, value, actor="config")
        case "load":
            return decisions.observe_load(state, node, value, 1000)
        case "up":
            return decisions.mark_up(state, node)
        case "down":
            return decisions.mark_down(state, node, "timeout", "no reply in 1 s")
        case "weight":
            return decisions.set_weight(state, node, int(value * 10), actor="admin:ops")
        case "drain":
            return decisions.set_draining(state, node, value < 0.3, actor="admin:ops")
    raise AssertionError(kind)


async def drive(journal, seed, count):
    """Record the commands' events, one record call each; the state after every seq."""
    views = {journal.state.seq: journal.state.to_dict()}
    for command in commands(seed, count):
        try:
            events = decide(journal.state, command)
        except decisions.InvalidCommand:  # e.g. adding a node the log already has
            continue
        for event in events:
            await journal.record([event])
            views[journal.state.seq] = journal.state.to_dict()
    return views


def test_replayed_state_equals_live_state_at_every_seq(backend):
    async def body():
        async with backend.log() as log:
            journal = Journal(log)
            await journal.open()
            views = await drive(journal, seed=1, count=300)
            await journal.close()
        assert len(views) > 200
        async with backend.log() as log:
            await log.open()
            replayed = RoutingState()
            async for batch in log.read():
                for record in batch:
                    replayed.apply(record.event())
                    assert replayed.to_dict() == views[record.seq], f"seq {record.seq}"
            await log.close()
        async with backend.log() as log:
            reopened = Journal(log)
            report = await reopened.open()
            assert report.replayed == journal.state.seq
            assert reopened.state.to_dict() == journal.state.to_dict()
            await reopened.close()

    asyncio.run(body())


def test_reopened_log_continues_the_sequence_and_chain(backend):
    async def body():
        async with backend.log() as log:
            journal = Journal(log)
            await journal.open()
            await drive(journal, seed=2, count=40)
            first_end, first_hash = log.last_seq, log.last_hash
            await journal.close()
        async with backend.log() as log:
            journal = Journal(log)
            await journal.open()
            assert (log.last_seq, log.last_hash) == (first_end, first_hash)
            await drive(journal, seed=3, count=40)
            await journal.close()
        async with backend.log() as log:
            await log.open()
            seqs, links, hashes = [], [], []
            async for batch in log.read():
                for record in batch:
                    seqs.append(record.seq)
                    links.append(record.prev_hash)
                    hashes.append(record.hash)
            await log.close()
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > first_end
        assert links[1:] == hashes[:-1]
        assert links[first_end] == first_hash  # the second writer chained onto the first

    asyncio.run(body())


def test_read_after_starts_at_the_next_seq(backend):
    async def body():
        async with backend.log() as log:
            journal = Journal(log)
            await journal.open()
            await drive(journal, seed=4, count=30)
            got = [r.seq async for batch in log.read(after=10) for r in batch]
            assert got == list(range(11, log.last_seq + 1))
            assert [r async for r in log.read(after=log.last_seq)] == []
            await journal.close()

    asyncio.run(body())


def test_close_waits_for_appends_not_yet_awaited(backend):
    async def body():
        async with backend.log() as log:
            journal = Journal(log)
            await journal.open()
            pending = [
                asyncio.ensure_future(journal.record(decide(journal.state, command)))
                for command in itertools.islice(commands(5, 0), 6)
            ]
            await asyncio.sleep(0)  # every record() has stamped, applied and queued
            await journal.close()
            await asyncio.gather(*pending)
            expected = journal.state.to_dict()
        async with backend.log() as log:
            reopened = Journal(log)
            await reopened.open()
            assert reopened.state.to_dict() == expected
            await reopened.close()

    asyncio.run(body())


def test_a_second_writer_cannot_interleave(backend):
    async def body():
        async with backend.log() as first_log, backend.log() as second_log:
            first = Journal(first_log)
            await first.open()
            second = Journal(second_log)
            try:
                await second.open()
            except LogLocked:  # the file log keeps a second writer out at open
                second = None
            await drive(first, seed=6, count=10)
            if second is not None:  # JetStream refuses the stale writer at its append
                with pytest.raises(StaleWriter):
                    await second.record(decisions.add_node(
                        second.state, "x9", "10.9.9.9", 9000, 1, actor="stale"
                    ))
                with contextlib.suppress(Exception):
                    await second.close()
            await first.close()
            expected = first.state.to_dict()
        async with backend.log() as log:
            reopened = Journal(log)
            await reopened.open()
            assert reopened.state.to_dict() == expected  # only the first writer's events
            await reopened.close()

    asyncio.run(body())
