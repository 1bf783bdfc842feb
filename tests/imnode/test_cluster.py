"""Two imnodes, real clients and a real nats-server: cross-node chat, status, drain,
and a NATS outage that clients never notice."""

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import jsonschema
import nats
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from imnode.app import NatsLink
from imnode.client import ClientError, ImClient
from tests.imnode.helpers import running_node
from tests.nats_server import NatsServer, free_port
from tests.schemas import schema

STATUS_FIELDS = ("node_id", "ip", "port", "connections", "capacity", "accepting", "draining",
                 "cpu", "loop_lag_ms", "uptime_s", "version", "ts")


@contextlib.asynccontextmanager
async def cluster(url, *node_ids, **options):
    """Nodes linked to NATS as `imnode serve` links them; yields the nodes."""
    async with contextlib.AsyncExitStack() as stack:
        nodes, links = [], []
        for node_id in node_ids:
            node = await stack.enter_async_context(running_node(node_id, **options))
            link = NatsLink(node, [url])
            link.start()
            stack.push_async_callback(link.close)
            nodes.append(node)
            links.append(link)
        for link in links:
            await asyncio.wait_for(link.connected.wait(), 10)
        yield nodes


def run(body):
    return asyncio.run(asyncio.wait_for(body(), 60))


async def gather(nc, subject, quiet=0.3, limit=10):
    """Scatter-gather: publish with a fresh inbox as reply; collect until a quiet period."""
    inbox = nc.new_inbox()
    replies = []
    subscription = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    with contextlib.suppress(TimeoutError):
        while len(replies) < limit:
            replies.append(orjson.loads((await subscription.next_msg(timeout=quiet)).data))
    await subscription.unsubscribe()
    return replies


def test_two_nodes_chat_across(nats_server):
    async def body():
        async with cluster(nats_server.url, "a1", "a2") as (n1, n2):
            alice, bob = ImClient("alice-x"), ImClient("bob-x")
            await alice.connect(n1.address)
            await bob.connect(n2.address)
            await asyncio.sleep(0.2)  # subscriptions reach the server
            await alice.send("bob-x", "over NATS")
            await bob.send("alice-x", {"reply": True})
            assert (await bob.receive(timeout=5))["body"] == "over NATS"
            assert (await alice.receive(timeout=5)) == {
                "type": "msg", "from": "bob-x", "body": {"reply": True}, "id": 1}
            started = time.monotonic()
            with pytest.raises(ClientError, match="offline"):
                await alice.send("nobody-x", "?")
            assert time.monotonic() - started < 1  # no responders: known at once
            await alice.close()
            await bob.close()

    run(body)


def test_login_on_another_node_replaces_the_older_session(nats_server):
    async def body():
        async with cluster(nats_server.url, "b1", "b2") as (n1, n2):
            older, newer = ImClient("carol-x"), ImClient("carol-x")
            await older.connect(n1.address)
            await asyncio.sleep(0.2)
            await newer.connect(n2.address)
            for _ in range(50):
                if older.goaways:
                    break
                await asyncio.sleep(0.05)
            assert older.goaways[0]["reason"] == "replaced"
            assert "carol-x" not in n1.sessions and "carol-x" in n2.sessions
            await newer.close()

    run(body)


def test_status_over_nats_and_micro_service_discovery(nats_server):
    async def body():
        async with cluster(nats_server.url, "c1", "c2", capacity=50) as (n1, _):
            client = ImClient("dave-x")
            await client.connect(n1.address)
            nc = await nats.connect(nats_server.url)
            reply = await nc.request("imnode.c1.status", b"", timeout=2)
            status = orjson.loads(reply.data)
            assert all(field in status for field in STATUS_FIELDS)
            assert (status["node_id"], status["ip"], status["port"]) == ("c1", *n1.address)
            assert (status["connections"], status["capacity"]) == (1, 50)
            assert status["accepting"] is True and status["draining"] is False
            schemas = {verb: schema(verb) for verb in ("ping", "info", "stats")}
            infos = [i for i in await gather(nc, "$SRV.INFO.imnode")
                     if i["metadata"]["node_id"] in ("c1", "c2")]
            assert sorted(i["metadata"]["node_id"] for i in infos) == ["c1", "c2"]
            for info in infos:
                jsonschema.validate(info, schemas["info"])
                node_id = info["metadata"]["node_id"]
                assert {e["name"]: e["subject"] for e in info["endpoints"]} == {
                    "status": f"imnode.{node_id}.status", "drain": f"imnode.{node_id}.drain"}
            for verb in ("ping", "stats"):
                for answer in await gather(nc, f"$SRV.{verb.upper()}.imnode"):
                    jsonschema.validate(answer, schemas[verb])
            await nc.close()
            await client.close()

    run(body)


def test_drain_requested_over_nats(nats_server):
    async def body():
        async with cluster(nats_server.url, "d1", drain_window=0.5, drain_timeout=5) as (n1,):
            clients = [ImClient(f"eve-{i}") for i in range(5)]
            for client in clients:
                await client.connect(n1.address)
            nc = await nats.connect(nats_server.url)
            reply = orjson.loads((await nc.request("imnode.d1.drain", b"", timeout=2)).data)
            assert reply == {"node_id": "d1", "draining": True}
            await asyncio.sleep(0.2)
            status = orjson.loads((await nc.request("imnode.d1.status", b"", timeout=2)).data)
            assert status["draining"] is True and status["accepting"] is False
            assert all(c.goaways and c.goaways[0]["reason"] == "drain" for c in clients)
            await asyncio.wait_for(n1.drained(), 5)
            await nc.close()

    run(body)


def test_nats_outage_leaves_clients_connected_and_status_returns(tmp_path):
    async def body(server):
        async with cluster(server.url, "e1", "e2") as (n1, n2):
            alice, bob = ImClient("alice-o"), ImClient("bob-o")
            await alice.connect(n1.address)
            await bob.connect(n2.address)
            server.stop()
            await asyncio.sleep(1.0)
            await alice.send("alice-o", "local delivery needs no NATS")
            assert (await alice.receive(timeout=5))["body"] == "local delivery needs no NATS"
            server.start()
            nc = await nats.connect(server.url)
            deadline = time.monotonic() + 15
            while True:  # the status responder comes back by itself
                try:
                    reply = await nc.request("imnode.e1.status", b"", timeout=0.5)
                    break
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    assert time.monotonic() < deadline, "status did not come back"
                    await asyncio.sleep(0.2)
            assert orjson.loads(reply.data)["connections"] == 1
            while True:  # and so does cross-node delivery
                try:
                    await alice.send("bob-o", "after the outage", timeout=1)
                    break
                except (ClientError, TimeoutError):
                    assert time.monotonic() < deadline, "delivery did not come back"
                    await asyncio.sleep(0.2)
            assert (await bob.receive(timeout=5))["body"] == "after the outage"
            assert alice.connected.is_set() and bob.connected.is_set()
            await nc.close()
            await alice.close()
            await bob.close()

    with NatsServer(tmp_path / "js") as server:
        run(lambda: body(server))


def scrape(port):
    """The node's /metrics as {(name, node): value}, parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, sample.labels.get("node")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_imnode_serve_answers_status_and_drains_on_sigterm(nats_server):
    metrics_port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "imnode", "serve", "--id", "cli1", "--listen", "127.0.0.1:0",
         "--nats", nats_server.url, "--capacity", "100", "--drain-window", "0.2",
         "--drain-timeout", "2", "--metrics-listen", f"127.0.0.1:{metrics_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("imnode cli1 listening on 127.0.0.1:"), line
        port = int(line.split(":")[1].split(",")[0])

        async def body():
            client = ImClient("frank-x")
            assert await client.connect(("127.0.0.1", port)) == "cli1"
            nc = await nats.connect(nats_server.url)
            deadline = time.monotonic() + 10
            while True:
                try:
                    reply = await nc.request("imnode.cli1.status", b"", timeout=0.5)
                    break
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
            status = orjson.loads(reply.data)
            assert status["connections"] == 1
            client.ping()
            for _ in range(100):  # until the node has read the ping
                figures = await asyncio.to_thread(scrape, metrics_port)
                if figures["imnode_heartbeats_total", "cli1"] >= 1:
                    break
                await asyncio.sleep(0.05)
            assert figures["imnode_connections", "cli1"] == 1
            assert figures["imnode_capacity", "cli1"] == 100
            assert figures["imnode_heartbeats_total", "cli1"] >= 1
            assert figures["imnode_heartbeats_timed_out_total", "cli1"] == 0
            assert figures["imnode_messages_in_total", "cli1"] == 0
            process.send_signal(signal.SIGTERM)
            for _ in range(40):
                if client.goaways:
                    break
                await asyncio.sleep(0.05)
            assert client.goaways[0]["reason"] == "drain"
            await nc.close()

        run(body)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--id", "a.b"], "NATS subject token"),
     (["--listen", "0.0.0.0:9000"], "--advertise IP:PORT is needed"),
     (["--advertise", "example.com:9000"], "must be an IP"),
     (["--capacity", "0"], "must be positive")],
)
def test_bad_serve_arguments(args, message):
    base = {"--id": "n1", "--listen": "127.0.0.1:0", "--nats": "nats://127.0.0.1:1",
            "--capacity": "10"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = [item for pair in base.items() for item in pair]
    result = subprocess.run([sys.executable, "-m", "imnode", "serve", *argv],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and message in result.stderr


def test_an_ipv6_address_is_written_in_brackets():
    """`[::1]:P`, as a URL or a config takes it, not `::1:P` (the red team's `::e000:1:9000`)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "imnode", "serve", "--id", "v6", "--listen", "[::1]:0",
         "--nats", "nats://127.0.0.1:1", "--capacity", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
    finally:
        process.kill()
        process.wait()
    assert re.match(r"imnode v6 listening on \[::1\]:\d+, advertised as \[::1\]:\d+$", line), line
