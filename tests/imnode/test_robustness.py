"""What one client must not be able to do to a node or to other clients, and races."""

import asyncio
import time

import nats
import orjson
import pytest

from imnode import protocol
from imnode.client import ClientError, ImClient
from imnode.load import LoadMonitor
from imnode.server import CONNECTION_INFLIGHT
from tests.imnode.helpers import RawSocket, running_node
from tests.imnode.test_cluster import cluster
from tests.nats_server import NatsServer


def run(body):
    return asyncio.run(asyncio.wait_for(body(), 60))


def test_a_flood_to_another_node_is_throttled_not_buffered(nats_server):
    async def body():
        async with cluster(nats_server.url, "f1", "f2") as (n1, n2):
            bob = ImClient("flood-bob")
            await bob.connect(n2.address)
            await asyncio.sleep(0.2)
            raw = await RawSocket.open(n1)
            raw.send({"type": "hello", "uid": "flood-mallory"})
            await raw.frame()
            count, peak = 3000, 0
            raw.send_bytes(b"".join(
                protocol.encode({"type": "msg", "to": "flood-bob", "body": i, "id": i})
                for i in range(count)))
            acks = 0
            while acks < count:
                peak = max(peak, n1.inflight)
                frame = await raw.frame(timeout=10)
                acks += frame["type"] == "ack"
            assert peak <= CONNECTION_INFLIGHT  # reading paused, TCP held the rest back
            received = [(await bob.receive(timeout=5))["body"] for _ in range(count)]
            assert received == list(range(count))
            await bob.close()
            raw.close()

    run(body)


def test_a_recipient_that_does_not_read_is_refused_messages_not_dropped():
    async def body():
        async with running_node(recipient_buffer=64 * 1024) as node:
            sleeper = await RawSocket.open(node)  # never reads what it is sent
            sleeper.send({"type": "hello", "uid": "sleeper"})
            sender = ImClient("sender")
            await sender.connect(node.address)
            refused = 0
            for _i in range(200):
                try:
                    await sender.send("sleeper", "x" * 30_000)
                except ClientError as exc:
                    assert exc.code == "recipient_busy"
                    refused += 1
            assert refused > 0 and node.stats["slow_consumers"] == 0
            assert "sleeper" in node.sessions  # not kicked by someone else's flood
            await sender.close()
            sleeper.close()

    run(body)


def test_a_client_closed_with_unread_data_leaves_at_once():
    async def body():
        async with running_node(heartbeat_interval=0.3, missed_heartbeats=1,
                                recipient_buffer=10**6, close_grace=30) as node:
            sleeper = await RawSocket.open(node)
            sleeper.send({"type": "hello", "uid": "zombie"})
            sender = ImClient("sender", heartbeat_interval=0.1)
            await sender.connect(node.address)
            for _ in range(20):  # fill its buffer; it reads nothing and sends nothing
                await sender.send("zombie", "y" * 30_000)
            await asyncio.sleep(1.0)  # past its heartbeat deadline
            assert "zombie" not in node.sessions and len(node.connections) == 1
            assert node.stats["heartbeats_timed_out"] == 1  # counted once, not every sweep
            with pytest.raises(ClientError, match="offline"):
                await sender.send("zombie", "anyone there?")
            await sender.close()
            sleeper.close()

    run(body)


def test_hello_during_drain_is_busy():
    async def body():
        async with running_node(drain_window=0.1, drain_timeout=5) as node:
            early = await RawSocket.open(node)  # accepted before the drain, no hello yet
            await asyncio.sleep(0.05)
            drain = asyncio.ensure_future(node.drain())
            await asyncio.sleep(0.05)
            early.send({"type": "hello", "uid": "latecomer"})
            assert (await early.frame())["code"] == "busy"
            assert "latecomer" not in node.sessions
            await asyncio.wait_for(drain, 5)

    run(body)


def test_a_body_nested_too_deep_to_forward_is_refused_not_fatal():
    async def body():
        async with running_node() as node:
            bob = ImClient("bob")
            await bob.connect(node.address)
            raw = await RawSocket.open(node)
            raw.send({"type": "hello", "uid": "alice"})
            await raw.frame()
            deep = b'{"type":"msg","to":"bob","id":1,"body":' + b"[" * 300 + b"0" + b"]" * 300
            deep += b"}"  # orjson reads 1024 levels but writes fewer: it cannot be forwarded
            raw.send_bytes(len(deep).to_bytes(4, "big") + deep)
            error = await raw.frame()
            assert (error["code"], error["id"]) == ("bad_body", 1)
            raw.send({"type": "msg", "to": "bob", "body": "fine", "id": 2})
            assert (await raw.frame()) == {"type": "ack", "id": 2}  # still connected
            assert (await bob.receive(timeout=5))["body"] == "fine"
            await bob.close()
            raw.close()

    run(body)


def test_near_simultaneous_logins_on_two_nodes_leave_exactly_one(nats_server):
    async def body():
        async with cluster(nats_server.url, "g1", "g2") as (n1, n2):
            for trial in range(10):
                uid = f"twin-{trial}"
                one, two = ImClient(uid), ImClient(uid)
                await asyncio.gather(one.connect(n1.address), two.connect(n2.address))
                for _ in range(100):  # the two notices cross over NATS: let them arrive
                    holders = [n for n in (n1, n2) if uid in n.sessions]
                    if len(holders) == 1:
                        break
                    await asyncio.sleep(0.05)
                assert len(holders) == 1, f"trial {trial}: held by {len(holders)} nodes"
                await asyncio.sleep(0.2)  # and it stays settled
                assert len([n for n in (n1, n2) if uid in n.sessions]) == 1
                for client in (one, two):
                    await client.close()

    run(body)


def test_a_node_that_attaches_late_settles_double_logins(nats_server):
    async def body():
        async with cluster(nats_server.url, "h1") as (n1,), running_node("h2") as n2:
            older, newer = ImClient("late-carol"), ImClient("late-carol")
            await older.connect(n1.address)
            await newer.connect(n2.address)  # n2 has no NATS yet: nobody hears of it
            nc = await nats.connect(nats_server.url)
            await n2.attach(nc)
            for _ in range(40):
                if older.goaways:
                    break
                await asyncio.sleep(0.05)
            assert older.goaways and older.goaways[0]["reason"] == "replaced"
            assert "late-carol" in n2.sessions and "late-carol" not in n1.sessions
            await newer.close()
            await n2.stop()
            await nc.close()

    run(body)


def test_uid_that_came_and_went_during_an_outage_is_offline_at_once_after(tmp_path):
    async def body(server):
        async with cluster(server.url, "o1", "o2") as (n1, n2):
            server.stop()
            await asyncio.sleep(0.5)
            ghost = ImClient("ghost")
            await ghost.connect(n2.address)  # while NATS is away
            await ghost.close()
            server.start()
            alice = ImClient("alice-g")
            await alice.connect(n1.address)
            deadline = time.monotonic() + 15
            while not (n1.nc.is_connected and n2.nc.is_connected):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            started = time.monotonic()
            with pytest.raises(ClientError, match="offline"):
                await alice.send("ghost", "are you there?")
            assert time.monotonic() - started < 1  # no stale subscription to time out on
            await alice.close()

    with NatsServer(tmp_path / "js") as server:
        run(lambda: body(server))


def test_client_keeps_trying_to_reconnect_after_a_failed_locate():
    async def body():
        async with running_node("r1", drain_window=0.05) as old, running_node("r2") as new:
            attempts = []

            async def locate(exclude):
                attempts.append(list(exclude))
                if len(attempts) < 3:
                    raise ClientError("http_503", "all full")
                return new.address

            client = ImClient("persistent", locate=locate)
            await client.connect(old.address)
            await old.drain()
            for _ in range(100):
                if client.node_id == "r2":
                    break
                await asyncio.sleep(0.05)
            assert client.node_id == "r2" and len(attempts) == 3
            assert client.gave_up is None
            await client.close()

    run(body)


def test_load_monitor_sees_a_short_stall():
    async def body():
        monitor = LoadMonitor(interval=1.0, probe=0.02)
        monitor.start()
        await asyncio.sleep(0.1)
        stop = time.monotonic() + 0.3
        while time.monotonic() < stop:  # the loop is busy, as a slow handler would keep it
            pass
        await asyncio.sleep(1.0)  # the first interval has closed; the second has not
        lag, cpu = monitor.loop_lag_ms, monitor.cpu
        await monitor.stop()
        return lag, cpu

    lag, cpu = asyncio.run(body())
    assert lag >= 250  # the probe that spanned the stall woke 300 ms late
    assert cpu >= 0.2  # 0.3 s of CPU in a 1 s interval


def test_status_reports_in_flight_messages(nats_server):
    async def body():
        async with cluster(nats_server.url, "s1") as (_n1,):
            nc = await nats.connect(nats_server.url)
            status = orjson.loads((await nc.request("imnode.s1.status", b"", timeout=2)).data)
            assert status["inflight"] == 0 and status["messages_refused"] == 0
            await nc.close()

    run(body)
