"""The dispatcher end to end: a real nats-server, three real imnode processes and
`imdispatch serve` as a real HTTP server, driven as operators and clients drive them."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from tests.nats_server import free_port

TOKEN = "ops:e2e-secret"
WEIGHTS = {"e2e1": 3, "e2e2": 2, "e2e3": 1}


def http(method, url, body=None, token=None):
    request = urllib.request.Request(url, method=method,
                                     data=None if body is None else json.dumps(body).encode())
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


class Cluster:
    def __init__(self, tmp_path, nats_url, slow_start=0, workers=1, capacity=10000,
                 assign_rate=0, log_file=None, file_size_limit=None, http_extra="",
                 admin_token=TOKEN, fast_path=None):
        self.tmp, self.nats_url, self.capacity = tmp_path, nats_url, capacity
        if fast_path is not None:  # [http] fast_path; None: the default
            http_extra += f"fast_path = {'true' if fast_path else 'false'}\n"
        self.log_file = log_file  # the dispatcher's JSON log at info level, if given
        self.file_size_limit = file_size_limit  # RLIMIT_FSIZE: a disk that fills up
        self.admin_token = admin_token  # None: no admin API
        self.node_ports = {node: free_port() for node in WEIGHTS}
        self.nodes = {}
        self.dispatcher = None
        try:
            for node in WEIGHTS:
                self.nodes[node] = self.start_node(node)
            self._configure_and_start(workers, slow_start, assign_rate, http_extra)
        except BaseException:  # leave nothing running behind a failed start
            self.stop()
            raise

    def _configure_and_start(self, workers, slow_start, assign_rate, http_extra):
        self.workers = workers
        self.http_port = free_port()
        self.config = self.tmp / "dispatcher.toml"
        self.config.write_text(
            f"[http]\nport = {self.http_port}\nretry_after = 2\nworkers = {workers}\n"
            f"{http_extra}"
            f'[nats]\nservers = ["{self.nats_url}"]\n'
            "[poll]\ninterval = 0.2\ntimeout = 0.15\nrise = 1\nfall = 2\nstale_after = 2.0\n"
            f"[balance]\nslow_start = {slow_start}\nassign_rate = {assign_rate}\n"
            f'[eventlog]\npath = "{self.tmp / "events"}"\nfsync = "always"\n'
            + "".join(f'[[nodes]]\nid = "{node}"\nip = "127.0.0.1"\nport = {port}\n'
                      f"weight = {WEIGHTS[node]}\n" for node, port in self.node_ports.items())
        )
        self.start_dispatcher()

    def start_node(self, node):
        process = subprocess.Popen(
            [sys.executable, "-m", "imnode", "serve", "--id", node, "--listen",
             f"127.0.0.1:{self.node_ports[node]}", "--nats", self.nats_url, "--capacity",
             str(self.capacity), "--log-level", "warning", "--drain-timeout", "1",
             "--drain-window", "0.5"],
            stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().startswith(f"imnode {node} listening")
        return process

    def start_dispatcher(self):
        env = {key: value for key, value in os.environ.items()
               if key != "IMDISPATCH_ADMIN_TOKEN"}
        if self.admin_token is not None:
            env["IMDISPATCH_ADMIN_TOKEN"] = self.admin_token
        logging = (["--log-level", "info", "--log-format", "json"] if self.log_file
                   else ["--log-level", "warning"])
        stderr = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        limit = self.file_size_limit

        def limit_file_size():  # in the child, before exec
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        self.dispatcher = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "serve", "--config", str(self.config),
             *logging], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
            preexec_fn=limit_file_size if limit else None)
        if stderr is not None:
            stderr.close()  # the child has its own copy
        assert self.dispatcher.stdout.readline().startswith("imdispatch serving")
        # every worker: a follower is ready once it has applied the leader's last cycle
        self.wait(lambda: all(self.get("/readyz")[0] == 200 for _ in range(3 * self.workers)),
                  "the dispatcher is ready")

    def url(self, path):
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path, token=None):
        return http("GET", self.url(path), token=token)

    def admin(self, method, path, body=None):
        return http(method, self.url(path), body, token=TOKEN.split(":")[1])

    def health(self):
        return {n["id"]: n["health"] for n in self.admin("GET", "/admin/nodes")[2]}

    def wait(self, condition, what, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except urllib.error.URLError:  # not listening yet
                pass
            assert time.monotonic() < deadline, f"timed out waiting until {what}"
            time.sleep(0.05)

    def stop(self):
        for process in (self.dispatcher, *self.nodes.values()):
            if process is not None and process.poll() is None:
                process.terminate()
        for process in (self.dispatcher, *self.nodes.values()):
            if process is not None:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# for the tests of get-tcp-ip and the HTTP protocol: with the fast path and without
FAST_OR_PLAIN = pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "plain"])


@pytest.fixture
def fast_path():
    """`[http] fast_path` for `cluster`: None leaves the default; FAST_OR_PLAIN sets it."""
    return None


@pytest.fixture
def cluster(tmp_path, nats_server, fast_path):
    running = Cluster(tmp_path, nats_server.url, fast_path=fast_path)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        yield running
    finally:
        running.stop()


def shares(cluster, count):
    picks = Counter()
    for _ in range(count):
        status, _, body = cluster.get("/get-tcp-ip?uid=u1")
        assert status == 200, body
        picks[body["node"]] += 1
    return picks


@FAST_OR_PLAIN
def test_shares_follow_weights_and_bad_input_is_a_clear_error(cluster):
    picks = shares(cluster, 600)
    for node, weight in WEIGHTS.items():
        assert abs(picks[node] / 600 - weight / 6) < 0.03, picks
    status, _, body = cluster.get("/get-tcp-ip?count=3")
    assert status == 200 and len({body["node"], *(b["node"] for b in body["backups"])}) == 3
    assert body["port"] == cluster.node_ports[body["node"]] and body["ip"] == "127.0.0.1"
    for query in ("count=0", "count=abc", "exclude=a.b", "uid=a%20b", "count=1&count=2"):
        status, _headers, body = cluster.get(f"/get-tcp-ip?{query}")
        assert status == 400 and "error" in body, (query, body)
    assert cluster.get("/admin/nodes")[0] == 401
    assert cluster.get("/admin/nodes", token="wrong")[0] == 401
    assert cluster.get("/healthz") == (200, cluster.get("/healthz")[1], {"status": "alive"})


@FAST_OR_PLAIN
def test_killed_node_is_out_at_once_and_all_drained_gives_503(cluster):
    victim = cluster.nodes["e2e1"]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = time.monotonic()
    cluster.wait(lambda: cluster.health()["e2e1"] == "down", "the killed node is down")
    detected = time.monotonic() - killed
    assert detected < 2.0  # no responders: down at the next poll, not after `fall` timeouts
    assert "e2e1" not in shares(cluster, 30)
    for node in ("e2e2", "e2e3"):
        status, _, _ = cluster.admin("PUT", f"/admin/nodes/{node}",
                                     {"draining": True, "reason": "maintenance"})
        assert status == 200
    status, headers, body = cluster.get("/get-tcp-ip")
    assert status == 503 and 2 <= int(headers["Retry-After"]) <= 4
    assert body["retry_after"] == int(headers["Retry-After"])
    status, _, events = cluster.admin("GET", "/admin/events?after=0&limit=1000")
    drained = [e for e in events if e["type"] == "node_drained"]
    assert [(e["actor"], e["reason"]) for e in drained] == [("admin:ops", "maintenance")] * 2
    down = [e for e in events if e["type"] == "node_down"]
    assert down[-1]["node"] == "e2e1" and down[-1]["cause"] == "no_responders"


def test_restart_rebuilds_the_same_state_and_replay_agrees(cluster, tmp_path):
    assert cluster.admin("PUT", "/admin/nodes/e2e2", {"weight": 7})[0] == 200
    status, _, added = cluster.admin("POST", "/admin/nodes",
                                     {"id": "e2e9", "ip": "127.0.0.9", "port": 9999})
    assert status == 201 and added["health"] == "unknown"
    routing = ("id", "ip", "port", "weight", "draining")
    before = [{k: n[k] for k in routing} for n in cluster.admin("GET", "/admin/nodes")[2]]
    cluster.dispatcher.send_signal(signal.SIGTERM)
    assert cluster.dispatcher.wait(timeout=10) == 0
    replayed = subprocess.run(
        [sys.executable, "-m", "dispatcher", "replay", "--log", str(tmp_path / "events"),
         "--json"], capture_output=True, text=True, timeout=60, check=True)
    assert [{k: n[k] for k in routing} for n in json.loads(replayed.stdout)] == before
    cluster.start_dispatcher()  # the config file still says weight 2: the admin's 7 stays
    after = [{k: n[k] for k in routing} for n in cluster.admin("GET", "/admin/nodes")[2]]
    assert after == before


def test_micro_service_answers_pick_and_nodes(cluster):
    import asyncio

    import jsonschema
    import nats

    from tests.schemas import schema

    async def ask():
        nc = await nats.connect(cluster.nats_url)
        try:
            pick = json.loads((await nc.request("imdispatch.pick",
                                                b'{"count": 2, "exclude": ["e2e1"]}',
                                                timeout=2)).data)
            nodes = json.loads((await nc.request("imdispatch.nodes", b"", timeout=2)).data)
            bad = await nc.request("imdispatch.pick", b'{"count": 9}', timeout=2)
            info = json.loads((await nc.request("$SRV.INFO.imdispatch", b"", timeout=2)).data)
            return pick, nodes, bad, info
        finally:
            await nc.close()

    pick, nodes, bad, info = asyncio.run(ask())
    assert pick["node"] != "e2e1" and len(pick["backups"]) == 1
    assert sorted(n["id"] for n in nodes) == sorted(WEIGHTS)
    assert bad.headers["Nats-Service-Error-Code"] == "400"
    jsonschema.validate(info, schema("info"))
    assert {e["name"]: e["subject"] for e in info["endpoints"]} == {
        "pick": "imdispatch.pick", "nodes": "imdispatch.nodes"}


@FAST_OR_PLAIN
def test_a_node_back_from_down_comes_back_through_slow_start(tmp_path, nats_server, fast_path):
    running = Cluster(tmp_path, nats_server.url, slow_start=3, fast_path=fast_path)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "nodes are up")
        time.sleep(3.2)  # past the first slow start
        victim = running.nodes["e2e1"]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        running.wait(lambda: running.health()["e2e1"] == "down", "e2e1 is down")
        running.nodes["e2e1"] = running.start_node("e2e1")
        running.wait(lambda: running.health()["e2e1"] == "up", "e2e1 is back")
        early = shares(running, 200)["e2e1"] / 200
        time.sleep(3.2)
        late = shares(running, 600)["e2e1"] / 600
        assert early < 0.3 and abs(late - 0.5) < 0.05, (early, late)  # its weight is 3 of 6
    finally:
        running.stop()


@FAST_OR_PLAIN
def test_nats_outage_keeps_last_known_state_and_reports_staleness(tmp_path, fast_path):
    from tests.nats_server import NatsServer

    with NatsServer(tmp_path / "js") as server:
        running = Cluster(tmp_path, server.url, fast_path=fast_path)
        try:
            running.wait(lambda: set(running.health().values()) == {"up"}, "nodes are up")
            server.stop()
            outage = time.monotonic()
            while time.monotonic() - outage < 3.0:  # past stale_after (2 s)
                assert running.get("/get-tcp-ip")[0] == 200
                time.sleep(0.1)
            status, _, ready = running.get("/readyz")
            assert status == 503 and "old" in ready["reason"] and not ready["nats_connected"]
            assert set(running.health().values()) == {"up"}  # nobody marked down for it
            server.start()
            running.wait(lambda: running.get("/readyz")[0] == 200, "fresh state again")
            running.wait(lambda: any(e["type"] == "polling_resumed" for e in running.admin(
                "GET", "/admin/events?limit=1000")[2]), "the outage is in the log")
            kinds = [e["type"] for e in running.admin("GET", "/admin/events?limit=1000")[2]]
            assert kinds.index("polling_paused") < kinds.index("polling_resumed")
        finally:
            running.stop()


@FAST_OR_PLAIN
def test_two_workers_share_one_log_and_agree(tmp_path, nats_server, fast_path):
    running = Cluster(tmp_path, nats_server.url, workers=2, fast_path=fast_path)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "nodes are up")
        roles = set()
        running.wait(lambda: roles.add(running.get("/readyz")[2]["role"]) or roles == {
            "leader", "follower"}, "both workers answered")
        assert running.admin("PUT", "/admin/nodes/e2e3", {"weight": 9})[0] == 200

        seqs = {}

        def caught_up():  # the follower's own state has the leader's latest event
            answer = running.get("/readyz")[2]
            seqs[answer["role"]] = answer["state_seq"]
            return len(seqs) == 2 and len(set(seqs.values())) == 1

        running.wait(caught_up, "the follower caught up", timeout=5)
        running.config.write_text(running.config.read_text().replace("weight = 1\n",
                                                                     "weight = 2\n"))
        running.dispatcher.send_signal(signal.SIGHUP)  # to the supervisor: passed to the leader
        running.wait(lambda: {n["id"]: n["weight"] for n in running.admin(
            "GET", "/admin/nodes")[2]}["e2e3"] == 2, "the reload took effect")
        assert running.dispatcher.poll() is None  # the supervisor survived its SIGHUP
        assert running.admin("PUT", "/admin/nodes/e2e3", {"weight": 9})[0] == 200
        seqs.clear()
        running.wait(caught_up, "the follower caught up again", timeout=5)
        picks = shares(running, 700)
        assert abs(picks["e2e3"] / 700 - 9 / 14) < 0.05, picks
        running.dispatcher.terminate()
        assert running.dispatcher.wait(timeout=15) == 0
        assert (tmp_path / "events" / "CLEAN").exists()  # the leader closed the log cleanly
    finally:
        running.stop()



@FAST_OR_PLAIN
def test_a_follower_takes_over_when_the_leader_worker_dies(tmp_path, nats_server, fast_path):
    running = Cluster(tmp_path, nats_server.url, workers=2, fast_path=fast_path)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "nodes are up")
        lock = tmp_path / "events" / "LOCK"
        leader = int(lock.read_text().split()[0])
        os.kill(leader, signal.SIGKILL)
        killed = time.monotonic()

        def new_leader():
            pid = int(lock.read_text().split()[0] or 0)
            return pid != leader and running.get("/readyz")[2]["role"] == "leader"

        running.wait(new_leader, "the other worker took over", timeout=10)
        took = time.monotonic() - killed
        assert took < 5, took
        # it polls: a node killed now goes down; it writes: admin changes are recorded
        running.nodes["e2e3"].kill()
        running.wait(lambda: running.health()["e2e3"] == "down", "the poll goes on")
        assert running.admin("PUT", "/admin/nodes/e2e1", {"weight": 4})[0] == 200
        assert running.dispatcher.poll() is None  # the supervisor still runs
        assert running.get("/get-tcp-ip")[0] == 200
    finally:
        running.stop()
    result = subprocess.run([sys.executable, "-m", "dispatcher", "verify", "--log",
                             str(tmp_path / "events")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_config_stops_the_start_naming_file_line_and_key(tmp_path):
    config = tmp_path / "dispatcher.toml"
    config.write_text("[poll]\ninterval = 1.0\nfall = -3\n")
    result = subprocess.run([sys.executable, "-m", "dispatcher", "serve", "--config",
                             str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{config}:3: [poll] fall: must be in 1..100, got -3" in result.stderr


def test_sighup_reloads_the_config_file(cluster):
    text = cluster.config.read_text().replace("weight = 1\n", "weight = 4\n")
    cluster.config.write_text(text)  # e2e3's weight: 1 -> 4
    cluster.dispatcher.send_signal(signal.SIGHUP)
    cluster.wait(lambda: {n["id"]: n["weight"] for n in cluster.admin("GET", "/admin/nodes")[2]}
                 ["e2e3"] == 4, "the reload took effect")
    events = cluster.admin("GET", "/admin/events?limit=1000")[2]
    changed = [e for e in events if e["type"] == "node_weight_set"]
    assert changed[-1]["actor"] == "config" and changed[-1]["node"] == "e2e3"


@FAST_OR_PLAIN
def test_nodes_filled_by_real_clients_get_none_then_503(tmp_path, nats_server, fast_path):
    import asyncio

    from imnode.client import ImClient

    running = Cluster(tmp_path, nats_server.url, capacity=10, assign_rate=1000,
                      fast_path=fast_path)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "nodes are up")

        async def fill():
            clients = []
            for node, port in running.node_ports.items():
                for i in range(10 if node != "e2e3" else 6):  # e2e3 stays below 0.9
                    client = ImClient(f"{node}-user-{i}")
                    await client.connect(("127.0.0.1", port))
                    clients.append(client)
            return clients

        async def scenario():
            clients = await fill()
            def overloaded():
                return {n["id"] for n in running.admin("GET", "/admin/nodes")[2]
                                              if n["overloaded"]}
            await asyncio.to_thread(running.wait, lambda: overloaded() == {"e2e1", "e2e2"},
                                    "the two full nodes are overloaded")
            picks = await asyncio.to_thread(shares, running, 3)
            assert set(picks) == {"e2e3"}  # only the node with room, and only a few
            for i in range(3):  # e2e3 reaches 0.9 with pending picks: no more clients
                client = ImClient(f"late-{i}")
                await client.connect(("127.0.0.1", running.node_ports["e2e3"]))
                clients.append(client)
            await asyncio.to_thread(running.wait, lambda: running.get("/get-tcp-ip")[0] == 503,
                                    "every node is full")
            status, headers, _body = running.get("/get-tcp-ip")
            assert status == 503 and int(headers["Retry-After"]) >= 2
            for client in clients[:4]:  # e2e1 falls to 6/10, below the low watermark
                await client.close()
            await asyncio.to_thread(running.wait, lambda: "e2e1" not in overloaded(),
                                    "e2e1 recovered")
            assert running.get("/get-tcp-ip")[2]["node"] == "e2e1"
            kinds = [(e["type"], e.get("node")) for e in running.admin(
                "GET", "/admin/events?limit=1000")[2]]
            assert ("node_overloaded", "e2e1") in kinds and ("node_recovered", "e2e1") in kinds
            for client in clients[4:]:
                await client.close()

        asyncio.run(scenario())
    finally:
        running.stop()
