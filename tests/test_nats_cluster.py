"""The three-server NATS cluster on loopback that cluster mode's tests stand on, against
real processes: it starts routed with a JetStream meta leader, an R3 stream outlives the
SIGKILL of its leader without losing an acknowledged message, the killed member rejoins
and catches up, and a failed start leaves no member behind."""

import asyncio
import json
import socket
import time

import nats
import pytest
from nats.errors import Error as NatsError

from dispatcher.demo.nats_cluster import NatsCluster
from tests.nats_server import run_with_client

STREAM = "CLUSTERTEST"
SUBJECT = "clustertest.events"
RESUME_LIMIT = 20.0  # liveness bound, not a speed target: raft elects within 4-9 s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with NatsCluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


async def publish_acked(js, i: int, deadline: float):
    """Publish message `i` until acknowledged. The message id makes a retry of a message
    the stream already holds (its ack lost with the leader) a duplicate, not a copy."""
    while True:
        try:
            return await js.publish(SUBJECT, str(i).encode(), timeout=0.5,
                                    headers={"Nats-Msg-Id": str(i)})
        except NatsError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def stream_leader(js, timeout: float = RESUME_LIMIT) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            leader = (await js.stream_info(STREAM)).cluster.leader
            if leader:
                return leader
        except NatsError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{STREAM} has no leader after {timeout} s")
        await asyncio.sleep(0.05)


async def lead_on(nc, name: str, timeout: float = RESUME_LIMIT) -> None:
    """Move the stream's leadership to member `name` (a leader step-down naming it)."""
    js = nc.jetstream(timeout=2)
    deadline = time.monotonic() + timeout
    while await stream_leader(js) != name:
        assert time.monotonic() < deadline, f"{name} never took the lead of {STREAM}"
        reply = await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}",
                                 json.dumps({"placement": {"preferred": name}}).encode(),
                                 timeout=2)
        assert json.loads(reply.data).get("success"), reply.data
        await asyncio.sleep(0.1)


def test_every_member_reaches_the_meta_leader_and_routes_carry_messages(cluster):
    assert len(set(cluster.urls)) == 3
    assert all(server.running for server in cluster.servers)

    async def main():
        clients = [await nats.connect(url) for url in cluster.urls]
        try:
            infos = [await nc.jetstream(timeout=2).account_info() for nc in clients]
            got = asyncio.get_running_loop().create_future()

            async def received(msg):
                if not got.done():
                    got.set_result(msg.data)

            await clients[-1].subscribe("route.check", cb=received)
            deadline = time.monotonic() + 5
            while not got.done() and time.monotonic() < deadline:  # until interest crossed
                await clients[0].publish("route.check", b"across")
                await asyncio.sleep(0.05)
            return infos, got.result() if got.done() else None
        finally:
            for nc in clients:
                await nc.close()

    infos, data = asyncio.run(main())
    assert len(infos) == 3
    assert data == b"across"  # published on member 0, delivered by member 2


def test_an_r3_stream_outlives_its_leaders_sigkill_and_the_member_catches_up(cluster):
    before, after = 50, 50
    ports = [server.port for server in cluster.servers]

    async def body(nc):
        """The stream leads on the member this client is connected to: the kill drops
        the client too, which must reconnect to another member and go on."""
        js = nc.jetstream(timeout=2)
        await js.add_stream(name=STREAM, subjects=[SUBJECT], num_replicas=3)
        acks = [await publish_acked(js, i, time.monotonic() + RESUME_LIMIT)
                for i in range(before)]
        leader = cluster.server_name(ports.index(nc.connected_url.port))
        await lead_on(nc, leader)
        cluster.kill(cluster.index_of(leader))
        acks += [await publish_acked(js, i, time.monotonic() + RESUME_LIMIT)
                 for i in range(before, before + after)]
        info = await js.stream_info(STREAM)
        payloads = [(await js.get_msg(STREAM, seq)).data for seq in range(1, before + after + 1)]
        return leader, nc.connected_url.port, acks, info, payloads

    leader, port_after, acks, info, payloads = run_with_client(cluster.urls, body)
    killed = cluster.index_of(leader)
    total = before + after
    assert port_after != cluster.servers[killed].port
    assert [ack.seq for ack in acks] == list(range(1, total + 1))  # each acked once, in order
    assert info.cluster.leader != leader
    assert (info.state.messages, info.state.last_seq) == (total, total)
    assert payloads == [str(i).encode() for i in range(total)]  # none lost, none doubled

    cluster.restart(killed)
    assert cluster.servers[killed].running

    async def caught_up(nc):
        """The rejoined member is current, then leads the stream (a raft leader holds
        every committed entry): its own client reads the stream's last sequence."""
        js = nc.jetstream(timeout=2)
        deadline = time.monotonic() + RESUME_LIMIT
        while True:
            cluster_info = (await js.stream_info(STREAM)).cluster
            peers = {peer.name: peer for peer in cluster_info.replicas or []}
            if cluster_info.leader == leader or (leader in peers and peers[leader].current):
                break
            assert time.monotonic() < deadline, f"{leader} never caught up: {cluster_info}"
            await asyncio.sleep(0.1)
        await lead_on(nc, leader)
        return await js.stream_info(STREAM)

    info = run_with_client(cluster.servers[killed].url, caught_up)
    assert info.cluster.leader == leader
    assert (info.state.messages, info.state.last_seq) == (total, total)


def test_a_failed_start_stops_every_member(tmp_path):
    doomed = NatsCluster(tmp_path, name="doomed")
    with socket.socket() as squatter:  # the last member's client port is taken: it exits
        squatter.bind(("127.0.0.1", doomed.servers[-1].port))
        squatter.listen()
        with pytest.raises(RuntimeError, match="nats-server exited"):
            doomed.start(timeout=10)
    assert not any(server.running for server in doomed.servers)
    for server in doomed.servers[:-1]:  # they had started: their ports are closed again
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
