"""Cluster mode's writers against a real nats-server: two members on one stream, each with
its own connection, tail and writer. Optimistic appends decided again on conflict, and
the stream itself fencing a deposed leader (no timing involved: the deposed member's tail
is held back so that it decides on a state that names it leader)."""

import asyncio
import itertools

import nats
import pytest

from dispatcher.cluster.tail import StreamTail
from dispatcher.cluster.writer import NotLeader, StreamWriter
from dispatcher.domain import decisions
from dispatcher.domain import events as ev
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog.jetstream import JetStreamLog
from dispatcher.eventlog.records import GENESIS_HASH
from dispatcher.journal import Rebuilt
from tests.nats_server import NatsServer

_names = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with NatsServer(tmp_path_factory.mktemp("nats") / "js") as running:
        yield running


class Member:
    """What `dispatcher.cluster.member.Member` builds, without the HTTP side."""

    def __init__(self, name: str, stream: str) -> None:
        self.name, self.stream = name, stream
        self.tail = StreamTail(Rebuilt(RoutingState(), 0, GENESIS_HASH), lambda batch: None)
        self.writer = StreamWriter(self.tail)
        self.following: asyncio.Task | None = None

    async def open(self, url: str) -> None:
        self.nc = await nats.connect(url)
        log = JetStreamLog(self.nc, stream=self.stream, subject=f"imdtest.{self.stream}",
                           shared=True, writer=self.name)
        await log.open()
        self.writer.log = log
        self.tail.saw(log.last_seq)
        self.follow()

    def follow(self) -> None:
        self.following = asyncio.get_running_loop().create_task(
            self.tail.run(lambda: self.writer.log))

    async def hold_back(self) -> None:
        """Stop folding (a stalled process, as far as the state is concerned)."""
        self.following.cancel()
        await asyncio.gather(self.following, return_exceptions=True)

    async def close(self) -> None:
        await self.hold_back()
        await self.writer.log.close()
        await self.nc.close()


def run(server, body):
    async def main():
        stream = f"FENCE_{next(_names)}"
        a, b = Member("a", stream), Member("b", stream)
        await a.open(server.url)
        await b.open(server.url)
        try:
            return await body(a, b)
        finally:
            await a.close()
            await b.close()

    return asyncio.run(main())


def elect(name):
    return lambda state: [] if state.leader == name else [ev.LeaderElected(leader=name)]


def add(node, port):
    return lambda state: decisions.add_node(state, node, "10.0.0.1", port, 1, actor="admin")


def test_concurrent_writers_both_land_one_deciding_again(server):
    async def body(a, b):
        await a.writer.commit(add("n1", 9001))
        await b.tail.reach(1, 5)
        calls = []

        def weight(value):
            def decide(state):
                calls.append((value, state.seq))
                return decisions.set_weight(state, "n1", value, actor="admin")
            return decide

        first, second = await asyncio.gather(a.writer.commit(weight(3)),
                                             b.writer.commit(weight(4)))
        assert [e.seq for e in first + second] in ([2, 3], [3, 2])
        # the loser was refused by the stream and decided again on the winner's state
        assert sorted(seq for _, seq in calls) == [1, 1, 2], calls
        await a.tail.reach(3, 5)
        await b.tail.reach(3, 5)
        assert a.tail.state.to_dict() == b.tail.state.to_dict()
        assert a.tail.state.nodes["n1"].weight in (3, 4)

    run(server, body)


def test_a_deposed_leader_is_refused_by_the_stream_not_by_its_clock(server):
    async def body(a, b):
        await a.writer.commit(elect("a"))
        await a.writer.commit(add("n1", 9001))
        await b.tail.reach(2, 5)
        await a.hold_back()  # a stalls: its state still says it leads
        await b.writer.commit(elect("b"))
        decided = []

        def mark_down(state):
            decided.append(state.seq)
            return decisions.mark_down(state, "n1", "timeout")

        attempt = asyncio.get_running_loop().create_task(
            a.writer.commit(mark_down, leader="a"))
        await asyncio.sleep(0.5)  # a decided on seq 2 and the stream refused it
        assert decided == [2] and not attempt.done()
        a.follow()  # a wakes: its state reaches b's election
        with pytest.raises(NotLeader):
            await attempt
        await b.tail.reach(3, 5)
        assert b.tail.seq == 3 and b.tail.state.leader == "b"
        assert b.tail.state.nodes["n1"].health == "unknown"

    run(server, body)


def test_a_commit_whose_caller_gave_up_does_not_block_the_next(server):
    """An admin request cancelled while its append waits (the client hung up during a
    stream election): the append may still land, and the next commit waits for it and
    decides on what was recorded, instead of failing."""
    import os
    import signal

    async def body(a, b):
        await a.writer.commit(add("n1", 9001))
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            first = asyncio.get_running_loop().create_task(a.writer.commit(
                lambda state: decisions.set_weight(state, "n1", 5, actor="admin")))
            await asyncio.sleep(0.3)
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        second = await a.writer.commit(
            lambda state: decisions.set_weight(state, "n1", 6, actor="admin"))
        assert [event.weight for event in second] == [6]
        await b.tail.reach(3, 10)
        weights = [e.weight for e in b.tail.state.changes if e.type == "node_weight_set"]
        assert weights == [5, 6]  # the abandoned append landed, once, before the next

    run(server, body)
