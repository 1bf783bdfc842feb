"""Faults injected into real processes: a node frozen (SIGSTOP), the broker killed, the
dispatcher killed in the middle of changes, a disk that fills up, a log that cannot be
written. The dispatcher keeps answering, loses no acknowledged event, and says so."""

import json
import signal
import subprocess
import sys
import threading
import time

from tests.nats_server import NatsServer
from tests.test_dispatcher_e2e import Cluster, shares

ROUTING_FIELDS = ("id", "ip", "port", "weight", "health", "health_cause", "draining",
                  "overloaded", "connections", "capacity")


def imdispatch(*args):
    return subprocess.run([sys.executable, "-m", "dispatcher", *args], capture_output=True,
                          text=True, timeout=60)


def routing(nodes):
    return {node["id"]: {key: node[key] for key in ROUTING_FIELDS} for node in nodes}


def test_a_frozen_node_is_a_timeout_not_a_dead_process_and_comes_back(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        frozen = running.nodes["e2e1"]
        frozen.send_signal(signal.SIGSTOP)  # its process lives, its replies stop
        try:
            running.wait(lambda: running.health()["e2e1"] == "down", "the frozen node is out")
            node = {n["id"]: n for n in running.admin("GET", "/admin/nodes")[2]}["e2e1"]
            assert node["health_cause"] == "timeout"  # not no_responders: it is subscribed
            assert "e2e1" not in shares(running, 30)
        finally:
            frozen.send_signal(signal.SIGCONT)
        running.wait(lambda: running.health()["e2e1"] == "up", "it answers again")
        assert "e2e1" in shares(running, 30)
    finally:
        running.stop()


def test_the_broker_killed_and_restarted_changes_nothing_for_clients(tmp_path):
    with NatsServer(tmp_path / "js") as server:
        running = Cluster(tmp_path, server.url)
        try:
            running.wait(lambda: set(running.health().values()) == {"up"}, "nodes are up")
            server.kill()  # SIGKILL: no goodbye to anyone
            answers = []
            outage = time.monotonic()
            while time.monotonic() - outage < 2.5:  # past stale_after (2 s)
                answers.append(running.get("/get-tcp-ip")[0])
                time.sleep(0.05)
            status, _, ready = running.get("/readyz")
            assert status == 503 and not ready["nats_connected"]
            server.start()  # same port, same store
            back = time.monotonic()
            while running.get("/readyz")[0] != 200:
                answers.append(running.get("/get-tcp-ip")[0])
                assert time.monotonic() - back < 15, "no fresh status after the restart"
                time.sleep(0.05)
            assert set(answers) == {200}  # never a 5xx, never a refusal, throughout
            running.wait(lambda: set(running.health().values()) == {"up"},
                         "the imnodes are back on NATS too")
            assert set(running.health().values()) == {"up"}
        finally:
            running.stop()


def test_a_dispatcher_killed_mid_stream_keeps_every_acknowledged_change(tmp_path,
                                                                       nats_server):
    running = Cluster(tmp_path, nats_server.url)  # fsync = "always"
    acknowledged, attempted = [], []
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        stop = threading.Event()

        def change_weights():
            weight = 10
            while not stop.is_set():
                weight += 1
                attempted.append(weight)
                try:
                    status, _, node = running.admin("PUT", "/admin/nodes/e2e2",
                                                    {"weight": weight, "reason": "stream"})
                except OSError:
                    return  # killed under us: this one is not acknowledged
                if status == 200:
                    acknowledged.append(node["weight"])

        changer = threading.Thread(target=change_weights)
        changer.start()
        time.sleep(1.5)  # polls and changes interleave
        before = routing(running.admin("GET", "/admin/nodes")[2])
        running.dispatcher.send_signal(signal.SIGKILL)
        running.dispatcher.wait()
        stop.set()
        changer.join(timeout=10)
    finally:
        running.stop()
    assert len(acknowledged) > 5
    verify = imdispatch("verify", "--log", str(tmp_path / "events"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    replay = imdispatch("replay", "--log", str(tmp_path / "events"), "--json")
    assert replay.returncode == 0, replay.stderr
    after = routing(json.loads(replay.stdout))
    # every acknowledged change is there; at most the changes in flight at the kill are more
    assert acknowledged[-1] <= after["e2e2"]["weight"] <= attempted[-1]
    before["e2e2"]["weight"] = after["e2e2"]["weight"]
    assert after == before
    try:
        running.start_dispatcher()  # and it starts again from that log
        assert routing(running.admin("GET", "/admin/nodes")[2])["e2e2"]["weight"] == \
            after["e2e2"]["weight"]
    finally:
        running.stop()


def test_a_full_disk_makes_the_dispatcher_unready_not_silent(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url, file_size_limit=24 * 1024)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        refused = None
        for weight in range(2, 500):  # each change a record, until the "disk" is full
            status, _, body = running.admin("PUT", "/admin/nodes/e2e1",
                                            {"weight": weight % 100 + 1})
            if status != 200:
                refused = status, body
                break
        assert refused is not None, "the log never filled up"
        assert refused[0] == 503 and "event log" in refused[1]["error"]
        assert "until it restarts" in refused[1]["error"]  # said honestly: live, not durable
        status, _, ready = running.get("/readyz")
        assert status == 503 and ready["event_log"] == "failed"
        assert "File too large" in ready["reason"] or "event log failed" in ready["reason"]
        assert running.get("/get-tcp-ip")[0] == 200  # clients still get the last state
        assert running.dispatcher.poll() is None
    finally:
        running.stop()
    assert running.dispatcher.returncode == 0  # it stops cleanly all the same
    verify = imdispatch("verify", "--log", str(tmp_path / "events"))
    assert verify.returncode == 0, verify.stdout + verify.stderr  # what was written is whole


def test_an_unwritable_log_directory_stops_the_start_with_the_reason(tmp_path):
    (tmp_path / "a-file").write_text("")
    config = tmp_path / "dispatcher.toml"
    config.write_text(f'[eventlog]\npath = "{tmp_path / "a-file" / "events"}"\n'
                      '[[nodes]]\nid = "n1"\nip = "127.0.0.1"\nport = 9001\n')
    result = imdispatch("serve", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"imdispatch serve: {config}: [eventlog] path: cannot "
                                     f"write in {tmp_path / 'a-file' / 'events'}: "
                                     "Not a directory")
