"""Cluster mode end to end, with real processes only: a three-server NATS cluster on
loopback (routes, JetStream, an R3 stream), three imnodes and three `imdispatch serve`
replicas sharing one JetStream history (`[eventlog] backend = "jetstream"`), one of them
with two workers."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from dispatcher.demo.nats_cluster import NatsCluster
from tests.nats_server import free_port
from tests.test_dispatcher_e2e import TOKEN, WEIGHTS, http

STREAM = "IMDTEST"
LEASE = 2.0
POLL = "[poll]\ninterval = 0.2\ntimeout = 0.15\nrise = 1\nfall = 1\nstale_after = 2.0\n"


class Replicas:
    """Three imnodes on a NATS cluster and `count` dispatcher replicas on one stream."""

    def __init__(self, tmp_path, nats: NatsCluster, count=3, workers=(1, 1, 2),
                 capacity=10000, balance="", stream=STREAM):
        self.tmp, self.nats, self.capacity = tmp_path, nats, capacity
        self.stream, self.balance = stream, balance
        self.node_ports = {node: free_port() for node in WEIGHTS}
        self.nodes: dict[str, subprocess.Popen] = {}
        self.replicas: list[subprocess.Popen | None] = []
        self.ports: list[int] = []
        self.workers = list(workers[:count])
        try:
            for index, node in enumerate(WEIGHTS):
                self.nodes[node] = self.start_node(node, nats.urls[index % 3])
            for index in range(count):
                self.ports.append(free_port())
                self.replicas.append(self.start_replica(index))
            for index in range(count):
                self.wait_ready(index)
        except BaseException:
            self.stop()
            raise

    def config_text(self, index: int) -> str:
        servers = ", ".join(f'"{url}"' for url in self.nats.urls[index % 3:]
                            + self.nats.urls[:index % 3])  # each its own first server
        return (f"[http]\nport = {self.ports[index]}\nretry_after = 1\n"
                f"workers = {self.workers[index]}\n"
                f"[nats]\nservers = [{servers}]\n{POLL}"
                f"[balance]\nslow_start = 0\n{self.balance}"
                f'[eventlog]\nbackend = "jetstream"\nstream = "{self.stream}"\nreplicas = 3\n'
                f"lease = {LEASE}\n"
                + "".join(f'[[nodes]]\nid = "{node}"\nip = "127.0.0.1"\nport = {port}\n'
                          f"weight = {WEIGHTS[node]}\n"
                          for node, port in self.node_ports.items()))

    def start_node(self, node: str, nats_url: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "imnode", "serve", "--id", node, "--listen",
             f"127.0.0.1:{self.node_ports[node]}", "--nats", nats_url, "--capacity",
             str(self.capacity), "--log-level", "warning"],
            stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().startswith(f"imnode {node} listening")
        return process

    def start_replica(self, index: int) -> subprocess.Popen:
        config = self.tmp / f"replica{index}.toml"
        config.write_text(self.config_text(index))
        env = {**os.environ, "IMDISPATCH_ADMIN_TOKEN": TOKEN}
        log = open(self.tmp / f"replica{index}.log", "ab")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "serve", "--config", str(config),
             "--log-level", "info"], stdout=subprocess.PIPE, stderr=log, text=True, env=env,
            start_new_session=True)
        log.close()
        assert process.stdout.readline().startswith("imdispatch serving"), self.log(index)
        return process

    def log(self, index: int) -> str:
        return (self.tmp / f"replica{index}.log").read_text(errors="replace")[-4000:]

    def url(self, index: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[index]}{path}"

    def get(self, index: int, path: str):
        return http("GET", self.url(index, path))

    def admin(self, index: int, method: str, path: str, body=None):
        return http(method, self.url(index, path), body, token=TOKEN.split(":")[1])

    def ready(self, index: int) -> dict:
        return self.get(index, "/readyz")[2]

    def wait_ready(self, index: int, timeout: float = 30.0) -> None:
        """Every worker of replica `index` ready (asked several times per worker)."""
        wait(lambda: all(self.get(index, "/readyz")[0] == 200
                         for _ in range(3 * self.workers[index])),
             f"replica {index} is ready", timeout, lambda: self.log(index))

    def leader(self) -> tuple[int, int]:
        """(replica index, pid) of the member that leads, as the replicas' readiness
        says; asked of every worker until exactly one says it leads."""
        for index, process in enumerate(self.replicas):
            if process is None or process.poll() is not None:
                continue
            for _ in range(4 * self.workers[index]):
                details = self.ready(index)
                if details.get("role") == "leader":
                    return index, int(details["member"].rsplit("-", 1)[1])
        raise AssertionError("no replica says it leads")

    def stop(self) -> None:
        processes = [p for p in (*self.replicas, *self.nodes.values()) if p is not None]
        for process in processes:
            if process.poll() is None:
                with _quiet():
                    os.kill(process.pid, signal.SIGCONT)
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, OSError)


def wait(condition, what, timeout=15.0, explain=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:  # not listening yet, or a worker just died
            pass
        assert time.monotonic() < deadline, f"timed out waiting until {what}\n{explain()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory):
    with NatsCluster(tmp_path_factory.mktemp("natscluster")) as running:
        yield running


@pytest.fixture
def replicas(tmp_path, nats_cluster, request):
    stream = f"IMD{request.node.name.__hash__() & 0xffffff:06x}"
    running = Replicas(tmp_path, nats_cluster, stream=stream)
    yield running
    running.stop()


def replay(nats_cluster, stream: str) -> list:
    out = subprocess.run(
        [sys.executable, "-m", "dispatcher", "replay", "--nats", nats_cluster.urls[0],
         "--stream", stream, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def shares(replicas: Replicas, index: int, count: int) -> Counter:
    got = Counter()
    for _ in range(count):
        status, _, body = replicas.get(index, "/get-tcp-ip")
        assert status == 200, body
        got[body["node"]] += 1
    return got


def test_an_admin_change_on_one_replica_reaches_every_replica(replicas, nats_cluster):
    status, _, body = replicas.admin(2, "PUT", "/admin/nodes/e2e3",
                                     {"weight": 0, "reason": "cluster test"})
    assert status == 200 and body["weight"] == 0, body
    changed = time.monotonic()
    for index in (0, 1):
        wait(lambda index=index: all(
            n["weight"] == 0 for n in replicas.admin(index, "GET", "/admin/nodes")[2]
            if n["id"] == "e2e3"), f"replica {index} has the new weight", timeout=1.0)
    assert time.monotonic() - changed < 1.0
    for index in range(3):
        assert "e2e3" not in shares(replicas, index, 30)
    # one history: the same seq and nodes everywhere, equal to a replay of the stream
    wait(lambda: len({replicas.ready(i)["state_seq"] for i in range(3)}) == 1,
         "every replica at the same seq")
    views = [replicas.admin(i, "GET", "/admin/nodes")[2] for i in range(3)]
    keys = ("id", "ip", "port", "weight", "draining")
    routing = [[{k: n[k] for k in keys} for n in view] for view in views]
    assert routing[0] == routing[1] == routing[2]
    replayed = replay(nats_cluster, replicas.stream)
    assert [{k: n[k] for k in keys} for n in replayed] == routing[0]
    events = replicas.admin(0, "GET", "/admin/events?after=0&limit=1000")[2]
    assert any(e["type"] == "node_weight_set" and e["reason"] == "cluster test"
               for e in events)
    assert sum(e["type"] == "leader_elected" for e in events) >= 1
