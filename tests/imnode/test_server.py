"""One imnode and real TCP clients: the protocol, heartbeats, capacity, bad input, drain."""

import asyncio
import time

import pytest

from imnode import protocol
from imnode.client import ClientError, ImClient
from tests.imnode.helpers import RawSocket, running_node


def run(body):
    return asyncio.run(asyncio.wait_for(body(), 30))


def test_hello_ping_and_local_chat():
    async def body():
        async with running_node(heartbeat_interval=5) as node:
            alice, bob = ImClient("alice"), ImClient("bob")
            assert await alice.connect(node.address) == "n1"
            await bob.connect(node.address)
            await alice.send("bob", {"text": "hi"})
            got = await bob.receive(timeout=5)
            assert got == {"type": "msg", "from": "alice", "body": {"text": "hi"}, "id": 1}
            raw = await RawSocket.open(node)
            raw.send({"type": "hello", "uid": "carol"})
            welcome = await raw.frame()
            assert welcome == {"type": "welcome", "node_id": "n1", "heartbeat_ms": 5000}
            raw.send({"type": "ping"})
            assert await raw.frame() == {"type": "pong"}
            assert node.status()["connections"] == 3 and node.status()["sessions"] == 3
            for client in (alice, bob):
                await client.close()
            raw.close()

    run(body)


def test_message_to_an_offline_uid_is_an_error_and_the_connection_stays():
    async def body():
        async with running_node() as node:
            alice = ImClient("alice")
            await alice.connect(node.address)
            with pytest.raises(ClientError, match="offline"):
                await alice.send("nobody", "hello?")
            alice.ping()  # still connected
            await alice.close()
            assert node.stats["messages_offline"] == 1

    run(body)


def test_second_login_of_a_uid_wins_and_the_first_gets_goaway():
    async def body():
        async with running_node() as node:
            first, second = ImClient("alice"), ImClient("alice")
            await first.connect(node.address)
            await second.connect(node.address)
            await asyncio.sleep(0.1)
            assert first.goaways == [{"type": "goaway", "reconnect_after_ms": 0,
                                      "reason": "replaced"}]
            bob = ImClient("bob")
            await bob.connect(node.address)
            await bob.send("alice", "to the newer one")
            assert (await second.receive(timeout=5))["body"] == "to the newer one"
            assert first.messages.empty()
            for client in (second, bob):
                await client.close()

    run(body)


def test_capacity_refuses_with_busy():
    async def body():
        async with running_node(capacity=2) as node:
            clients = [ImClient(f"u{i}") for i in range(2)]
            for client in clients:
                await client.connect(node.address)
            with pytest.raises(ClientError, match="busy"):
                await ImClient("u3").connect(node.address)
            assert node.stats["refused_busy"] == 1 and len(node.connections) == 2
            await clients[0].close()
            await asyncio.sleep(0.05)
            await ImClient("u4").connect(node.address)  # room again

    run(body)


def test_silent_client_is_closed_after_missed_heartbeats():
    async def body():
        async with running_node(heartbeat_interval=0.2, missed_heartbeats=2) as node:
            quiet, chatty = await RawSocket.open(node), ImClient("chatty")
            quiet.send({"type": "hello", "uid": "quiet"})
            await quiet.frame()
            await chatty.connect(node.address)  # pings every 0.2 s, as told in welcome
            error = await quiet.frame(timeout=3)
            assert error["code"] == "heartbeat_timeout"
            assert await quiet.closed()
            await asyncio.sleep(0.5)
            assert chatty.connected.is_set()
            assert node.stats["heartbeats_timed_out"] == 1
            await chatty.close()

    run(body)


def test_no_hello_in_time_is_closed():
    async def body():
        async with running_node(hello_timeout=0.3) as node:
            raw = await RawSocket.open(node)
            assert (await raw.frame(timeout=3))["code"] == "hello_timeout"
            assert await raw.closed()

    run(body)


BAD_INPUT = {
    "oversized frame": lambda raw: raw.send_bytes((70_000).to_bytes(4, "big") + b"x" * 100),
    "invalid json": lambda raw: raw.send_bytes(b"\x00\x00\x00\x05{nope"),
    "not an object": lambda raw: raw.send_bytes(b"\x00\x00\x00\x02[]"),
    "first frame not hello": lambda raw: raw.send({"type": "ping"}),
    "bad uid": lambda raw: raw.send({"type": "hello", "uid": "a.b"}),
}


@pytest.mark.parametrize("send_bad", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_answered_with_error_and_closed_others_unaffected(send_bad):
    async def body():
        async with running_node() as node:
            alice, bob = ImClient("alice"), ImClient("bob")
            await alice.connect(node.address)
            await bob.connect(node.address)
            raw = await RawSocket.open(node)
            send_bad(raw)
            error = await raw.frame()
            assert error["type"] == "error" and error["code"] and error["message"]
            assert await raw.closed()
            await alice.send("bob", "still here")
            assert (await bob.receive(timeout=5))["body"] == "still here"
            await alice.close()
            await bob.close()

    run(body)


@pytest.mark.parametrize(
    ("frame", "code"),
    [({"type": "launch"}, "unknown_type"), ({"type": "hello", "uid": "x"}, "hello_twice"),
     ({"type": "msg", "to": "bob"}, "bad_msg"), ({"type": "msg", "to": "a b", "id": 1},
                                                 "bad_uid")],
)
def test_bad_frames_after_hello(frame, code):
    async def body():
        async with running_node() as node:
            raw = await RawSocket.open(node)
            raw.send({"type": "hello", "uid": "mallory"})
            await raw.frame()
            raw.send(frame)
            assert (await raw.frame())["code"] == code
            assert await raw.closed()

    run(body)


def test_client_that_never_completes_a_frame_is_closed():
    async def body():
        async with running_node(heartbeat_interval=0.5, missed_heartbeats=2) as node:
            raw = await RawSocket.open(node)
            raw.send({"type": "hello", "uid": "slow"})
            await raw.frame()
            started = time.monotonic()
            raw.send_bytes((1000).to_bytes(4, "big"))  # a 1000-byte frame announced...
            for _ in range(8):  # ...and trickling in for 0.8 s, never complete
                raw.send_bytes(b"x")
                await asyncio.sleep(0.1)
            assert (await raw.frame(timeout=3))["code"] == "heartbeat_timeout"
            # Closed 1 s after the last whole frame; had the trickle counted, 1.8 s or later.
            assert time.monotonic() - started < 1.6

    run(body)


def test_drain_sends_spread_goaways_and_finishes_when_clients_leave():
    async def body():
        async with running_node(drain_window=2.0, drain_timeout=10) as node:
            clients = [ImClient(f"u{i}") for i in range(40)]
            for client in clients:
                await client.connect(node.address)
            drain = asyncio.ensure_future(node.drain())
            await asyncio.sleep(0.2)
            assert node.status()["draining"] and not node.status()["accepting"]
            delays = [c.goaways[0]["reconnect_after_ms"] for c in clients]
            assert all(c.goaways[0]["reason"] == "drain" for c in clients)
            assert min(delays) >= 0 and max(delays) <= 2000 and len(set(delays)) > 20
            await asyncio.wait_for(drain, 5)  # the clients left (no locate: they stay away)
            assert not node.connections
            with pytest.raises(OSError):
                await ImClient("late").connect(node.address)

    run(body)


def test_drain_closes_stragglers_at_the_timeout():
    async def body():
        async with running_node(drain_window=0.1, drain_timeout=0.5) as node:
            raw = await RawSocket.open(node)  # ignores goaway and stays
            raw.send({"type": "hello", "uid": "stubborn"})
            await raw.frame()
            await asyncio.wait_for(node.drain(), 3)
            assert (await raw.frame())["type"] == "goaway"
            assert await raw.closed()

    run(body)


def test_client_follows_goaway_to_where_the_dispatcher_says():
    async def body():
        async with running_node("n1", drain_window=0.3) as old, running_node("n2") as new:
            asked = []

            async def locate(exclude):
                asked.append(list(exclude))
                return new.address

            client = ImClient("roamer", locate=locate)
            assert await client.connect(old.address) == "n1"
            await old.drain()
            for _ in range(50):
                if client.node_id == "n2":
                    break
                await asyncio.sleep(0.05)
            assert client.node_id == "n2" and client.reconnects == 1
            assert asked == [["n1"]]
            await client.close()

    run(body)


def test_client_whose_node_dies_asks_again_and_waits_as_told():
    async def body():
        async def dies_after_welcome(reader, writer):  # a node that crashes
            await reader.readexactly(protocol.LENGTH_BYTES)
            writer.write(protocol.encode({"type": "welcome", "node_id": "dead",
                                          "heartbeat_ms": 30_000}))
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.transport.abort()

        dead = await asyncio.start_server(dies_after_welcome, "127.0.0.1", 0)
        async with running_node("n2") as new:
            asked = []

            async def locate(exclude):
                asked.append((list(exclude), time.monotonic()))
                if len(asked) == 1:  # every node full for a moment
                    raise ClientError("http_503", "no IM node can take a client now", 0.4)
                return new.address

            client = ImClient("survivor", locate=locate)
            assert await client.connect(dead.sockets[0].getsockname()) == "dead"
            for _ in range(100):
                if client.node_id == "n2":
                    break
                await asyncio.sleep(0.05)
            assert client.node_id == "n2" and client.reconnects == 1
            assert [exclude for exclude, _ in asked] == [["dead"], []]
            assert asked[1][1] - asked[0][1] >= 0.4  # the Retry-After was honoured
            await client.close()
        dead.close()

    run(body)


async def fake_node(node_id, *, welcome=True, then=None):
    """A node that says hello back (or hangs up first), then does `then(writer)`."""

    async def serve(reader, writer):
        await reader.readexactly(protocol.LENGTH_BYTES)
        if not welcome:
            writer.transport.abort()  # gone mid-handshake
            return
        writer.write(protocol.encode({"type": "welcome", "node_id": node_id,
                                      "heartbeat_ms": 30_000}))
        await writer.drain()
        if then is not None:
            await then(writer)

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def address(server):
    return server.sockets[0].getsockname()


def test_client_survives_a_node_that_hangs_up_mid_handshake_and_late_errors():
    async def body():
        async def late_error_then_die(writer):
            writer.write(protocol.encode({"type": "error", "code": "timeout",
                                          "message": "too late", "id": 99}))
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.transport.abort()

        first = await fake_node("first", then=late_error_then_die)
        broken = await fake_node("broken", welcome=False)
        async with running_node("n2") as good:
            answers = [address(broken), good.address]

            async def locate(exclude):
                return answers.pop(0)

            client = ImClient("tough", locate=locate)
            await client.connect(address(first))
            for _ in range(100):
                if client.node_id == "n2":
                    break
                await asyncio.sleep(0.05)
            assert client.node_id == "n2" and client.closed_by_server is None
            assert client.gave_up is None and answers == []
            await client.close()
        first.close()
        broken.close()

    run(body)


def test_close_during_a_reconnect_leaves_nothing_connected():
    async def body():
        async def die(writer):
            await asyncio.sleep(0.1)
            writer.transport.abort()

        async def slow_welcome(reader, writer):  # the handshake is under way at close()
            await reader.readexactly(protocol.LENGTH_BYTES)
            await asyncio.sleep(0.4)
            writer.write(protocol.encode({"type": "welcome", "node_id": "slow",
                                          "heartbeat_ms": 30_000}))
            await writer.drain()
            await asyncio.sleep(5)

        dying = await fake_node("dying", then=die)
        slow = await asyncio.start_server(slow_welcome, "127.0.0.1", 0)
        asked = asyncio.Event()

        async def locate(exclude):
            asked.set()
            return address(slow)

        client = ImClient("leaver", locate=locate)
        await client.connect(address(dying))
        await asyncio.wait_for(asked.wait(), 5)
        await asyncio.sleep(0.1)
        await client.close()
        await asyncio.sleep(0.6)
        assert not client.connected.is_set() and client.node_id == "dying"
        dying.close()
        slow.close()

    run(body)


def test_dispatcher_locator_asks_get_tcp_ip_over_http():
    from imnode.client import dispatcher_locator

    async def body():
        requests = []

        async def answer(reader, writer):
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            requests.append(head.split("\r\n")[0])
            if "exclude=n1%2Cn2" in head:
                status, payload = "503 Service Unavailable", b'{"error":"all full","retry_after":3}'
            else:
                status, payload = "200 OK", b'{"node":"n7","ip":"127.0.0.7","port":9007}'
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        locate = dispatcher_locator(f"http://127.0.0.1:{port}", "alice")
        assert await locate([]) == ("127.0.0.7", 9007)
        assert await locate(["n1"]) == ("127.0.0.7", 9007)
        with pytest.raises(ClientError, match="http_503: all full") as refused:
            await locate(["n1", "n2"])
        assert refused.value.retry_after == 3
        assert requests == [
            "GET /get-tcp-ip?uid=alice HTTP/1.1",
            "GET /get-tcp-ip?uid=alice&exclude=n1 HTTP/1.1",
            "GET /get-tcp-ip?uid=alice&exclude=n1%2Cn2 HTTP/1.1",
        ]
        server.close()

    run(body)
