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

from bench.processes import stop
from dispatcher.demo.nats_cluster import NatsCluster
from tests.nats_server import free_port
from tests.test_dispatcher_e2e import TOKEN, WEIGHTS, http

STREAM = "IMDTEST"
LEASE = 2.0
POLL = "[poll]\ninterval = 0.2\ntimeout = 0.15\nrise = 1\nfall = 1\nstale_after = 2.0\n"


class Replicas:
    """Three imnodes on a NATS cluster and `count` dispatcher replicas on one stream."""

    def __init__(self, tmp_path, nats: NatsCluster, count=3, workers=(1, 1, 2),
                 capacity=10000, balance="", stream=STREAM, eventlog="", lease=LEASE,
                 poll=POLL):
        self.tmp, self.nats, self.capacity = tmp_path, nats, capacity
        self.stream, self.balance, self.eventlog = stream, balance, eventlog
        self.lease, self.poll = lease, poll
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
                f"[nats]\nservers = [{servers}]\n{self.poll}"
                f"[balance]\nslow_start = 0\n{self.balance}"
                f'[eventlog]\nbackend = "jetstream"\nstream = "{self.stream}"\nreplicas = 3\n'
                f"lease = {self.lease}\n{self.eventlog}"
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
        if not config.exists():  # a restarted replica keeps its file (edited, maybe)
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

    def add(self, workers: int = 1) -> int:
        """Start one more replica; its index."""
        index = len(self.replicas)
        self.ports.append(free_port())
        self.workers.append(workers)
        self.replicas.append(self.start_replica(index))
        self.wait_ready(index)
        return index

    def log(self, index: int) -> str:
        return (self.tmp / f"replica{index}.log").read_text(errors="replace")[-4000:]

    def url(self, index: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[index]}{path}"

    def get(self, index: int, path: str):
        return http("GET", self.url(index, path))

    def admin(self, index: int, method: str, path: str, body=None):
        return http(method, self.url(index, path), body, token=TOKEN.split(":")[1])

    def health(self, index: int) -> dict:
        return {n["id"]: n["health"] for n in self.admin(index, "GET", "/admin/nodes")[2]}

    def ready(self, index: int) -> dict:
        return self.get(index, "/readyz")[2]

    def wait_ready(self, index: int, timeout: float = 30.0) -> None:
        """Every worker of replica `index` ready (asked several times per worker)."""
        wait(lambda: all(self.get(index, "/readyz")[0] == 200
                         for _ in range(3 * self.workers[index])),
             f"replica {index} is ready", timeout, lambda: self.log(index))

    def leader(self) -> tuple[int, str]:
        """(replica index, member id) of the member that leads, as the replicas'
        readiness says (each worker is asked several times)."""
        for index, process in enumerate(self.replicas):
            if process is None or process.poll() is not None:
                continue
            for _ in range(4 * self.workers[index]):
                details = self.ready(index)
                if details.get("role") == "leader":
                    return index, details["member"]
        raise AssertionError("no replica says it leads")

    def stop(self) -> None:
        processes = [p for p in (*self.replicas, *self.nodes.values()) if p is not None]
        for process in processes:
            if process.poll() is None:
                with _quiet():
                    os.kill(process.pid, signal.SIGCONT)  # a stopped one cannot stop
        stop(*processes)


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


def kill_replica(replicas: Replicas, index: int, sig=signal.SIGKILL) -> None:
    """Signal a whole replica: its supervisor and every worker (its own session)."""
    os.killpg(replicas.replicas[index].pid, sig)
    if sig == signal.SIGKILL:
        replicas.replicas[index].wait(timeout=10)
        replicas.replicas[index] = None


def leader_by_others(replicas: Replicas, skip: int) -> tuple[int, dict] | None:
    """A replica other than `skip` whose worker says it leads, with a fresh poll cycle."""
    for index in range(len(replicas.replicas)):
        if index == skip or replicas.replicas[index] is None:
            continue
        for _ in range(2 * replicas.workers[index]):
            details = replicas.ready(index)
            age = details.get("last_poll_age_s")
            if details.get("role") == "leader" and age is not None and age < 0.5:
                return index, details
    return None


def stream_messages(nats_cluster, stream: str) -> list:
    """(seq, headers, event) of every message in the stream, straight from JetStream."""
    import asyncio

    import nats

    async def main():
        nc = await nats.connect(nats_cluster.urls)
        try:
            js = nc.jetstream(timeout=5)
            last = (await js.stream_info(stream)).state.last_seq
            found = []
            for seq in range(1, last + 1):
                raw = await js.get_msg(stream, seq)
                found.append((seq, raw.headers or {}, json.loads(raw.data)))
            return found
        finally:
            await nc.close()

    return asyncio.run(main())


def test_the_leader_replica_killed_another_leads_and_a_dead_node_gets_no_clients(
        replicas, nats_cluster):
    old, _ = replicas.leader()
    kill_replica(replicas, old)
    killed = time.monotonic()
    found = []
    wait(lambda: found.append(leader_by_others(replicas, old)) or found[-1],
         "another replica leads with a fresh poll cycle", timeout=LEASE + 10)
    took = time.monotonic() - killed
    _, details = found[-1]
    assert details["leader"] == details["member"]
    # within the lease plus a poll interval, plus the lease's tick and the KV's expiry
    assert took < LEASE + 0.2 + 1.5, f"{took:.2f} s to a new leader's poll cycle"
    replicas.nodes["e2e1"].kill()
    replicas.nodes["e2e1"].wait()
    dead = time.monotonic()
    alive = [i for i, p in enumerate(replicas.replicas) if p is not None]

    def nobody_sends_to_e2e1():
        return all("e2e1" not in shares(replicas, index, 12) for index in alive)

    wait(nobody_sends_to_e2e1, "no replica sends clients to the dead node", timeout=2.0)
    assert time.monotonic() - dead < 2.0
    events = [event for _, _, event in stream_messages(nats_cluster, replicas.stream)]
    elected = [event["leader"] for event in events if event["type"] == "leader_elected"]
    assert len(elected) >= 2 and elected[-1] == details["member"]


def test_a_stalled_leader_is_fenced_by_the_stream(replicas, nats_cluster):
    old, old_member = replicas.leader()
    kill_replica(replicas, old, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        found = []
        wait(lambda: found.append(leader_by_others(replicas, old)) or found[-1],
             "another replica leads", timeout=LEASE + 10)
        new_member = found[-1][1]["member"]
        # a change the stalled leader has not seen: it would decide it again on waking
        replicas.nodes["e2e3"].kill()
        replicas.nodes["e2e3"].wait()
        wait(lambda: replicas.health(1 if old != 1 else 0)["e2e3"] == "down",
             "the new leader marks the dead node down")
        time.sleep(max(0.0, 10.0 - (time.monotonic() - stopped_at)))
        before_waking = len(stream_messages(nats_cluster, replicas.stream))
    finally:
        os.killpg(replicas.replicas[old].pid, signal.SIGCONT)
    replicas.wait_ready(old)
    time.sleep(1.0)  # the woken member's poller had every chance to append
    messages = stream_messages(nats_cluster, replicas.stream)
    woken = [(seq, event["type"]) for seq, headers, event in messages[before_waking:]
             if headers.get("Imd-Writer") == old_member]
    assert woken == [], f"the deposed leader appended {woken}"
    downs = [(headers.get("Imd-Writer"), event["cause"]) for _, headers, event in messages
             if event["type"] == "node_down" and event["node"] == "e2e3"]
    assert downs == [(new_member, "no_responders")], downs
    # one history: verify passes; no health decision recorded twice in a row
    out = subprocess.run(
        [sys.executable, "-m", "dispatcher", "verify", "--nats", nats_cluster.urls[1],
         "--stream", replicas.stream], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    last_health: dict[str, tuple] = {}
    for seq, _, event in messages:
        if event["type"] in ("node_up", "node_down"):
            key = (event["type"], event.get("cause"))
            assert last_health.get(event["node"]) != key, f"seq {seq} repeats {key}"
            last_health[event["node"]] = key


def stream_leader_server(nats_cluster, stream: str) -> int:
    """The index in `nats_cluster` of the server that leads `stream`."""
    import asyncio

    import nats

    async def main():
        nc = await nats.connect(nats_cluster.urls)
        try:
            info = await nc.jetstream(timeout=5).stream_info(stream)
            return nats_cluster.index_of(info.cluster.leader)
        finally:
            await nc.close()

    return asyncio.run(main())


async def _no_chatter(_exc: Exception) -> None:
    """A client's reconnect chatter while a server is down is expected here."""


class LeaderElected:
    """When JetStream announces the stream's next leader (its advisory), as heard on the
    servers other than `killed`: a thread with a client of its own."""

    def __init__(self, nats_cluster, stream: str, killed: int) -> None:
        import asyncio
        import threading

        import nats

        self.at: float | None = None
        subscribed, self._stop = threading.Event(), None
        urls = [url for index, url in enumerate(nats_cluster.urls) if index != killed]

        async def watch():
            self._stop = asyncio.Event()
            nc = await nats.connect(urls, error_cb=_no_chatter)

            async def heard(_msg):
                self.at = self.at or time.monotonic()

            await nc.subscribe(f"$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{stream}", cb=heard)
            await nc.flush()
            subscribed.set()
            await self._stop.wait()
            await nc.close()

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(watch(),))
        self._thread.start()
        assert subscribed.wait(10), "no subscription to the leader advisory"

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def test_the_streams_nats_server_killed_no_event_lost_and_clients_served(
        replicas, nats_cluster):
    import threading
    import urllib.request

    acknowledged = []
    for weight in (4, 5, 6):
        status, _, body = replicas.admin(weight % 3, "PUT", "/admin/nodes/e2e2",
                                         {"weight": weight})
        assert status == 200, body
        acknowledged.append(weight)
    seq_before = replicas.ready(0)["state_seq"]
    server = stream_leader_server(nats_cluster, replicas.stream)
    answers: Counter = Counter()
    refusals: list = []  # (replica, when, body) of each answer that was not a 200
    stop = threading.Event()

    def clients():
        while not stop.is_set():
            for index in range(3):
                try:
                    with urllib.request.urlopen(replicas.url(index, "/get-tcp-ip"),
                                                timeout=2) as response:
                        answers[response.status] += 1
                except Exception as exc:
                    answers[getattr(exc, "code", type(exc).__name__)] += 1
                    refusals.append((index, time.monotonic(), getattr(exc, "read", str)()))
            time.sleep(0.01)

    thread = threading.Thread(target=clients)
    thread.start()
    elected = LeaderElected(nats_cluster, replicas.stream, server)
    try:
        time.sleep(0.5)
        nats_cluster.kill(server)
        killed = time.monotonic()
        resumed = None
        while resumed is None and time.monotonic() - killed < 30:
            try:  # the append waits for the stream's new leader: longer than http()'s 5 s
                status, _, body = http("PUT", replicas.url(0, "/admin/nodes/e2e2"),
                                       {"weight": 7}, token=TOKEN.split(":")[1])
            except TimeoutError:
                continue
            if status == 200:
                resumed = time.monotonic() - killed
            else:
                time.sleep(0.1)
        assert resumed is not None, "writes never resumed"
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
        elected.close()
        nats_cluster.restart(server)
    assert set(answers) == {200}, (answers, refusals[:5], killed)
    assert answers[200] > 100
    events = [event for _, _, event in stream_messages(nats_cluster, replicas.stream)]
    weights = [event["weight"] for event in events
               if event["type"] == "node_weight_set" and event["node"] == "e2e2"]
    assert weights[:3] == acknowledged and weights[-1] == 7
    assert len(events) > seq_before
    for index in range(3):
        replicas.wait_ready(index)
    # nats-server elects the stream's next leader 4-9 s after a SIGKILL (raft's election
    # timeout, fixed in nats-server); what is ours is how soon writes follow it
    assert elected.at is not None, "JetStream announced no new leader"
    print(f"writes resumed {resumed:.2f} s after the stream leader's server was killed, "
          f"{resumed - (elected.at - killed):.2f} s after JetStream announced a new leader")
    assert resumed - (elected.at - killed) < 1.0, (resumed, elected.at - killed)


def test_replicas_filling_nodes_at_once_stay_within_the_watermark(tmp_path, nats_cluster):
    """Three replicas (four members) fill the nodes with real clients at once: each takes
    its share of the headroom, so no node goes past ceil(0.9 x capacity) by more than
    1% of its capacity."""
    import asyncio
    import math

    from tests.filler import fill

    capacity = 1000
    running = Replicas(tmp_path, nats_cluster, capacity=capacity,
                       balance="assign_rate = 100000\n", stream="IMDFILL")
    try:
        wait(lambda: all(running.ready(i)["members"] == 4 for i in range(3)
                         for _ in range(3 * running.workers[i])), "every member counted")

        async def together():
            kept: list = []  # no filler closes its clients while another still fills
            try:
                return await asyncio.gather(*(fill(running.url(i, ""), seconds=40, keep=kept)
                                              for i in range(3)))
            finally:
                for writer in kept:
                    writer.close()

        results = asyncio.run(together())
        held = Counter()
        for result in results:
            held.update(result["held"])
        limit = math.ceil(0.9 * capacity)
        assert any(result["refused"] > 0 for result in results), results  # it filled them
        assert all(count <= limit + capacity // 100 for count in held.values()), held
        assert sum(held.values()) >= 3 * limit - 30, held  # and nearly to the top
        print(f"held per node: {dict(held)} (limit {limit})")
    finally:
        running.stop()


def set_weights(running: Replicas, count: int) -> None:
    """`count` events: e2e1's weight set to 1..count, on replica 0 and 1 in turn."""
    for weight in range(1, count + 1):
        status, _, body = running.admin(weight % 2, "PUT", "/admin/nodes/e2e1",
                                        {"weight": weight})
        assert status == 200, body


def snapshot_names(nats_cluster, stream: str) -> list:
    import asyncio

    import nats

    async def main():
        nc = await nats.connect(nats_cluster.urls)
        try:
            store = await nc.jetstream(timeout=5).object_store(f"{stream}_SNAPSHOTS")
            return sorted(info.name for info in await store.list(ignore_deletes=True))
        except Exception:
            return []
        finally:
            await nc.close()

    return asyncio.run(main())


def put_object(nats_cluster, bucket: str, name: str, data: bytes) -> None:
    import asyncio

    import nats

    async def main():
        nc = await nats.connect(nats_cluster.urls)
        try:
            await (await nc.jetstream(timeout=5).object_store(bucket)).put(name, data)
        finally:
            await nc.close()

    asyncio.run(main())


def test_a_joining_replica_starts_from_the_newest_sound_snapshot(tmp_path, nats_cluster):
    running = Replicas(tmp_path, nats_cluster, count=2, workers=(1, 1), stream="IMDJOIN",
                       eventlog="snapshot_every = 20\n")
    try:
        set_weights(running, 60)
        wait(lambda: snapshot_names(nats_cluster, "IMDJOIN"), "a snapshot is kept")
        names = snapshot_names(nats_cluster, "IMDJOIN")
        sound = int(names[-1][9:29])
        seq = running.ready(0)["state_seq"]
        assert 20 <= sound <= seq
        # a damaged snapshot newer than the sound ones is skipped, with a note
        bad = f"snapshot-{seq:020d}.json"
        put_object(nats_cluster, "IMDJOIN_SNAPSHOTS", bad, b'{"format": 1, "seq": 3}')
        index = running.add()
        log = running.log(index)
        assert f"skipped snapshot {bad}" in log, log
        assert f"from snapshot at seq {sound} plus" in log, log
        wait(lambda: len({running.ready(i)["state_seq"] for i in range(3)}) == 1,
             "the new replica at the same seq")
        views = [running.admin(i, "GET", "/admin/nodes")[2] for i in range(3)]
        assert views[2] == views[0] or [n["weight"] for n in views[2]] == [
            n["weight"] for n in views[0]]
        assert [n["weight"] for n in views[2] if n["id"] == "e2e1"] == [60]
    finally:
        running.stop()


def test_a_leader_stopped_cleanly_hands_over_at_once(replicas):
    old, _ = replicas.leader()
    process = replicas.replicas[old]
    process.terminate()
    stopped = time.monotonic()
    found = []
    wait(lambda: found.append(leader_by_others(replicas, old)) or found[-1],
         "another replica leads", timeout=LEASE + 10)
    took = time.monotonic() - stopped
    assert process.wait(timeout=15) == 0
    replicas.replicas[old] = None
    # the lease was given up: no waiting for it to expire
    assert took < LEASE, f"{took:.2f} s"


def test_a_reload_on_one_replica_reaches_every_replica(replicas):
    """SIGHUP to the supervisor of the two-worker replica: each worker reloads, the
    first records the change, the others find nothing left to change."""
    config = replicas.tmp / "replica2.toml"
    text = config.read_text()
    config.write_text(text.replace("weight = 2\n", "weight = 9\n", 1))
    os.kill(replicas.replicas[2].pid, signal.SIGHUP)

    def weight_everywhere():
        return all([n["weight"] for n in replicas.admin(index, "GET", "/admin/nodes")[2]
                    if n["id"] == "e2e2"] == [9] for index in range(3))

    wait(weight_everywhere, "every replica has the reloaded weight", timeout=3.0)
    events = replicas.admin(0, "GET", "/admin/events?after=0&limit=1000")[2]
    changes = [e for e in events if e["type"] == "node_weight_set" and e["node"] == "e2e2"]
    assert len(changes) == 1 and changes[0]["actor"] == "config", changes


def stream_state(nats_cluster, stream: str):
    import asyncio

    import nats

    async def main():
        nc = await nats.connect(nats_cluster.urls)
        try:
            return (await nc.jetstream(timeout=5).stream_info(stream)).state
        finally:
            await nc.close()

    return asyncio.run(main())


def test_a_bounded_history_is_trimmed_to_a_snapshot_and_stays_whole(tmp_path, nats_cluster):
    """retain_events on a cluster: the leader purges the stream up to the oldest kept
    snapshot (snapshots 20 events apart, two kept, so the newest 15 are always after
    it); verify and replay start there and agree with the replicas; a replica that joins
    afterwards starts from a snapshot."""
    running = Replicas(tmp_path, nats_cluster, count=2, workers=(1, 1), stream="IMDTRIM",
                       eventlog="snapshot_every = 20\nretain_events = 15\nkeep_snapshots = 2\n")
    try:
        set_weights(running, 150)
        wait(lambda: stream_state(nats_cluster, "IMDTRIM").first_seq > 1,
             "the leader trimmed the stream")
        state = stream_state(nats_cluster, "IMDTRIM")
        kept = [int(name[9:29]) for name in snapshot_names(nats_cluster, "IMDTRIM")]
        assert state.first_seq - 1 in kept, (state, kept)  # a kept snapshot anchors it
        assert state.last_seq - state.first_seq + 1 >= 15  # the newest 15 at least
        out = subprocess.run(
            [sys.executable, "-m", "dispatcher", "verify", "--nats", nats_cluster.urls[0],
             "--stream", "IMDTRIM"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "history starts after seq" in out.stdout + out.stderr, out.stdout
        index = running.add()
        assert "rebuilt the state from snapshot at seq" in running.log(index), running.log(index)
        wait(lambda: len({running.ready(i)["state_seq"] for i in range(3)}) == 1,
             "every replica at the same seq")
        keys = ("id", "ip", "port", "weight", "draining")
        view = [{k: n[k] for k in keys} for n in running.admin(2, "GET", "/admin/nodes")[2]]
        assert [{k: n[k] for k in keys} for n in replay(nats_cluster, "IMDTRIM")] == view
        assert [n["weight"] for n in view if n["id"] == "e2e1"] == [150]
    finally:
        running.stop()


def test_every_admin_answer_holds_whichever_worker_or_replica_takes_it(replicas,
                                                                      nats_cluster):
    """One client, one request after another, alternating workers and replicas: a PUT
    answered 200 is in the stream (a worker whose state had not yet folded the previous
    PUT saw "nothing to change"), a node just added can be removed (not a 404 from a
    stale worker), and a GET shows the client's own last write."""
    weights = []
    for k in range(60):
        weight = 5 if k % 2 == 0 else 3
        index = (2, 0, 2, 1)[k % 4]  # replica 2 has two workers
        status, _, body = replicas.admin(index, "PUT", "/admin/nodes/e2e1",
                                         {"weight": weight, "reason": f"lu{k}"})
        assert status == 200, body
        weights.append(weight)
        status, _, view = replicas.admin((index + 1) % 3 if k % 3 else 2, "GET",
                                         "/admin/nodes")
        assert [n["weight"] for n in view if n["id"] == "e2e1"] == [weight], k
    for k in range(20):
        node = {"id": f"ryw{k}", "ip": "127.0.0.1", "port": 20000 + k}
        status, _, body = replicas.admin(2, "POST", "/admin/nodes", node)
        assert status == 201, body
        status, _, body = replicas.admin(2, "DELETE", f"/admin/nodes/ryw{k}")
        assert status == 200, (k, body)
    recorded = {event["reason"] for _, _, event in stream_messages(nats_cluster,
                                                                   replicas.stream)
                if event["type"] == "node_weight_set"}
    assert {f"lu{k}" for k in range(60)} <= recorded


def test_a_replica_restarted_with_an_edited_file_records_the_change(replicas):
    """Every member applies the file it was started with against the recorded config,
    not the recorded config against itself (a rolling restart with a new file)."""
    replicas.replicas[0].terminate()
    assert replicas.replicas[0].wait(timeout=15) == 0
    config = replicas.tmp / "replica0.toml"
    config.write_text(config.read_text().replace("weight = 3\n", "weight = 8\n", 1))
    replicas.replicas[0] = replicas.start_replica(0)
    replicas.wait_ready(0)

    def weight_everywhere():
        return all([n["weight"] for n in replicas.admin(index, "GET", "/admin/nodes")[2]
                    if n["id"] == "e2e1"] == [8] for index in range(3))

    wait(weight_everywhere, "every replica has the restarted replica's weight", timeout=3.0)
