"""Faults aimed at the poller, injected into real processes: a broker frozen under the
dispatcher (its NATS client must not go blind), a frozen node that then dies, junk on the
poller's reply inbox, a node removed and added again. Plus the pure rule that the health
tracker only remembers nodes that exist."""

import asyncio
import json
import signal
import threading
import time

import nats
import orjson
import pytest

from dispatcher.domain.health import Failure, HealthTracker, NodeStatus
from tests.nats_server import NatsServer
from tests.test_dispatcher_e2e import Cluster, shares


def events(running, after=0):
    return running.admin("GET", f"/admin/events?after={after}&limit=1000")[2]


def nodes(running):
    return {node["id"]: node for node in running.admin("GET", "/admin/nodes")[2]}


def all_up(running):
    running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")


def ask_imdispatch(url):
    """The `imdispatch` micro service's node list and how many instances answer a PING."""

    async def ask():
        nc = await nats.connect(url)
        try:
            listed = json.loads((await nc.request("imdispatch.nodes", b"", timeout=2)).data)
            inbox = nc.new_inbox()
            pings = await nc.subscribe(inbox)
            await nc.publish("$SRV.PING.imdispatch", b"", reply=inbox)
            instances = set()
            with_deadline = asyncio.get_running_loop().time() + 1.0
            while (left := with_deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    instances.add(json.loads((await pings.next_msg(timeout=left)).data)["id"])
                except nats.errors.TimeoutError:
                    break
            return sorted(node["id"] for node in listed), len(instances)
        finally:
            await nc.close()

    return asyncio.run(ask())


@pytest.mark.parametrize("workers", [1, 2])
def test_a_broker_frozen_for_two_seconds_leaves_no_blind_poller(tmp_path, workers):
    with NatsServer(tmp_path / "js") as server:
        running = Cluster(tmp_path, server.url, workers=workers)
        try:
            all_up(running)
            before = events(running)[-1]["seq"]
            server.process.send_signal(signal.SIGSTOP)
            frozen = time.monotonic()
            try:
                def says_so():  # every worker: several answers in a row
                    answers = [running.get("/readyz") for _ in range(3 * workers)]
                    return all(status == 503 and "NATS" in ready["reason"]
                               for status, _, ready in answers)
                # two poll intervals (0.4 s), plus the HTTP round trips on a busy machine
                running.wait(says_so, "/readyz says the NATS link is broken", timeout=1.5)
                time.sleep(max(0.0, 2.0 - (time.monotonic() - frozen)))  # the fault: 2 s
            finally:
                server.process.send_signal(signal.SIGCONT)
            running.wait(lambda: running.get("/readyz")[0] == 200, "ready again", timeout=15)
            assert [e for e in events(running, before) if e["type"] == "node_down"] == []
            running.nodes["e2e3"].send_signal(signal.SIGKILL)  # now a node really dies
            killed = time.monotonic()
            running.wait(lambda: nodes(running)["e2e3"]["health_cause"] == "no_responders",
                         "the killed node is out for no responders", timeout=5)
            assert time.monotonic() - killed < 2.0  # seen at the next polls, not minutes
            out = max(e["seq"] for e in events(running, before) if e["type"] == "node_down")
            running.wait(lambda: all(running.get("/readyz")[2]["state_seq"] >= out
                                     for _ in range(3 * workers)),
                         "every worker has applied it (a follower tails the log)")
            assert "e2e3" not in shares(running, 30)
            status, _, ready = running.get("/readyz")
            assert status == 200 and ready["nats_connected"] and not ready["panic"]
            listed, instances = ask_imdispatch(server.url)  # the service moved along
            assert listed == ["e2e1", "e2e2", "e2e3"] and instances == workers  # each one
        finally:
            running.stop()


def test_when_every_node_times_out_the_link_is_suspected_before_the_nodes(tmp_path,
                                                                         nats_server):
    running = Cluster(tmp_path, nats_server.url)
    try:
        all_up(running)
        before = events(running)[-1]["seq"]
        for node in running.nodes.values():
            node.send_signal(signal.SIGSTOP)  # all at once: as a broken link would look
        try:
            running.wait(lambda: set(running.health().values()) == {"down"},
                         "every frozen node is down in the end")
        finally:
            for node in running.nodes.values():
                node.send_signal(signal.SIGCONT)
        kinds = [(e["type"], e.get("reason") or "") for e in events(running, before)]
        first_down = [kind for kind, _ in kinds].index("node_down")
        assert any(kind == "polling_paused" and "every node timed out" in reason
                   for kind, reason in kinds[:first_down]), kinds  # a new link first
        assert ("polling_resumed", "new NATS connection") in kinds[:first_down], kinds
        all_up(running)
        assert running.get("/readyz")[0] == 200
    finally:
        running.stop()


def test_a_frozen_node_that_dies_is_never_doubted_by_panic_mode(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url)
    first, second = running.nodes["e2e1"], running.nodes["e2e2"]
    try:
        all_up(running)
        first.send_signal(signal.SIGSTOP)
        second.send_signal(signal.SIGSTOP)
        running.wait(lambda: [nodes(running)[n]["health_cause"] for n in ("e2e1", "e2e2")]
                     == ["timeout", "timeout"], "both frozen nodes are down for timeout")
        assert running.get("/readyz")[2]["panic"]  # 1 of 3 up: panic doubts the timeouts
        first.send_signal(signal.SIGKILL)  # dies while frozen: its subscription goes
        first.wait()
        running.wait(lambda: nodes(running)["e2e1"]["health_cause"] == "no_responders",
                     "the dead node's cause is updated", timeout=5)
        assert nodes(running)["e2e1"]["health"] == "down"
        causes = [e["cause"] for e in events(running)
                  if e["type"] == "node_down" and e["node"] == "e2e1"]
        assert causes == ["timeout", "no_responders"]  # the new cause is an event
        picked = shares(running, 60)
        assert "e2e1" not in picked and "e2e2" in picked  # still panic, the dead one out
    finally:
        second.send_signal(signal.SIGCONT)
        running.stop()


def test_junk_on_the_poller_inbox_does_not_end_a_cycle(tmp_path, nats_server):
    """A slow but healthy node (80 ms) stays up while someone publishes junk replies to
    the poller's inbox the moment each status request goes out."""
    running = Cluster(tmp_path, nats_server.url)
    stop = threading.Event()
    serving = threading.Event()

    async def slow_node_and_junk():
        nc = await nats.connect(running.nats_url)

        async def answer(msg):
            prefix = msg.reply.rsplit(".", 1)[0]
            for junk in ("junk1", "junk2", "junk3", "junk4"):
                await nc.publish(f"{prefix}.{junk}", b"{}")
            await nc.flush()
            await asyncio.sleep(0.08)
            await nc.publish(msg.reply, orjson.dumps({
                "node_id": "slow", "ip": "127.0.0.1", "port": 9999, "connections": 0,
                "capacity": 100, "accepting": True, "draining": False, "cpu": 0.0,
                "loop_lag_ms": 0.0, "uptime_s": 1.0, "version": "0.1.0", "ts": time.time()}))

        await nc.subscribe("imnode.slow.status", cb=answer)
        await nc.flush()
        serving.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await nc.close()

    thread = threading.Thread(target=asyncio.run, args=(slow_node_and_junk(),))
    thread.start()
    try:
        assert serving.wait(10)
        all_up(running)
        status, _, _ = running.admin("POST", "/admin/nodes",
                                     {"id": "slow", "ip": "127.0.0.1", "port": 9999})
        assert status == 201
        running.wait(lambda: nodes(running)["slow"]["health"] == "up", "the slow node is up")
        after = events(running)[-1]["seq"]
        deadline = time.monotonic() + 2.0  # ten poll cycles, each with junk
        while time.monotonic() < deadline:
            assert set(running.health().values()) == {"up"}
            time.sleep(0.1)
        assert [e for e in events(running, after) if e["type"] == "node_down"] == []
    finally:
        stop.set()
        thread.join(10)
        running.stop()


def test_a_node_removed_and_added_again_rises_from_nothing(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url)
    try:
        all_up(running)
        running.dispatcher.terminate()  # again with rise = 3 and a slower poll
        assert running.dispatcher.wait(10) == 0
        running.config.write_text(running.config.read_text().replace(
            "interval = 0.2\ntimeout = 0.15\nrise = 1", "interval = 0.5\ntimeout = 0.3\nrise = 3"))
        running.start_dispatcher()
        all_up(running)
        time.sleep(1.0)  # e2e3 gathers a longer streak of good replies
        port = nodes(running)["e2e3"]["port"]
        assert running.admin("DELETE", "/admin/nodes/e2e3")[0] == 200
        assert running.admin("POST", "/admin/nodes",
                             {"id": "e2e3", "ip": "127.0.0.1", "port": port})[0] == 201
        running.wait(lambda: nodes(running)["e2e3"]["health"] == "up", "e2e3 is up again")
        added = [e for e in events(running) if e["type"] == "node_added"
                 and e["node"] == "e2e3"][-1]
        up = [e for e in events(running) if e["type"] == "node_up" and e["node"] == "e2e3"][-1]
        # three good replies one poll interval apart: at least two intervals after the add
        assert up["time"] - added["time"] >= 0.9, up["time"] - added["time"]
    finally:
        running.stop()


def test_the_health_tracker_remembers_only_the_nodes_polled():
    tracker = HealthTracker(rise=3, fall=2)
    ok = NodeStatus(1, 10, True, False)
    for round_ in range(50):
        current = {f"n{round_}": object(), "steady": object()}
        tracker.retain(current)
        tracker.observe(f"n{round_}", ok, "unknown")
        tracker.observe("steady", Failure("timeout", "slow"), "up")
    assert set(tracker._streak) == {"n49", "steady"}  # not fifty ids


def test_a_node_replaced_under_the_same_id_starts_a_new_streak():
    tracker = HealthTracker(rise=3, fall=2)
    ok = NodeStatus(1, 10, True, False)
    old = {"n1": object()}
    tracker.retain(old)
    assert [tracker.observe("n1", ok, "unknown") for _ in range(3)] == [None, None, "up"]
    tracker.retain({"n1": object()})  # removed and added again between two polls
    assert [tracker.observe("n1", ok, "down") for _ in range(3)] == [None, None, "up"]
