"""Several workers are one dispatcher: a real `imdispatch serve` with two workers, a real
nats-server and real imnodes. Reloads are all or nothing and reach every worker through
the log; a follower knows at once when the leader's log fails; admin commands racing on
one node answer what was recorded; dead workers are replaced."""

import contextlib
import os
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.test_dispatcher_e2e import Cluster


@pytest.fixture
def two_workers(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url, workers=2)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        by_role(running)  # both started (a first start after a reload is not covered)
        yield running
    finally:
        running.stop()


def by_role(running, timeout=15):
    """Each worker's /readyz answer (status, body), by role, once both have answered;
    the kernel hands each new connection to one of them."""
    answers = {}

    def both():
        status, _, body = running.get("/readyz")
        answers[body["role"]] = status, body
        return set(answers) == {"leader", "follower"}

    running.wait(both, "both workers answered", timeout=timeout)
    return answers


def events(running):
    return running.admin("GET", "/admin/events?after=0&limit=1000")[2]


def weights(running):
    return {n["id"]: n["weight"] for n in running.admin("GET", "/admin/nodes")[2]}


def test_a_reload_the_core_refuses_records_nothing_and_names_key_and_line(two_workers):
    running = two_workers
    before = [e for e in events(running) if e["actor"] == "config"]
    text = running.config.read_text().replace("weight = 1\n", "weight = 4\n")
    text = text.replace("[balance]\n", "[balance]\nhigh_watermark = 0.0000001\n"
                                      "low_watermark = 0.0000001\n")  # in order, too small
    running.config.write_text(text)
    line = text.splitlines().index("high_watermark = 0.0000001") + 1
    status, _, body = running.admin("POST", "/admin/reload")
    assert status == 400, body
    assert f"dispatcher.toml:{line}: [balance] high_watermark" in body["error"]
    running.dispatcher.send_signal(signal.SIGHUP)  # the same file by the other road
    running.wait(lambda: by_role(running), "both workers still answer")
    assert [e for e in events(running) if e["actor"] == "config"] == before
    assert weights(running)["e2e3"] == 1  # the node change in the same file: not applied
    assert running.dispatcher.poll() is None


def test_a_reload_of_worker_settings_reaches_every_worker_through_the_log(two_workers):
    running = two_workers
    text = running.config.read_text().replace("retry_after = 2\n", "retry_after = 30\n")
    running.config.write_text(text.replace("stale_after = 2.0\n", "stale_after = 7.5\n"))
    status, _, body = running.admin("POST", "/admin/reload")
    assert status == 200 and "config_reloaded" in body["changes"], body
    recorded = [e for e in events(running) if e["type"] == "config_reloaded"][-1]["config"]
    assert recorded["http"] == {"retry_after": 30} and recorded["poll"]["stale_after"] == 7.5
    assert "nats" not in recorded  # no secrets in the log
    running.wait(lambda: {body["stale_after_s"] for _, body in by_role(running).values()}
                 == {7.5}, "both workers take the new staleness bound")
    for node in ("e2e1", "e2e2", "e2e3"):  # nobody can take a client: every answer a 503
        assert running.admin("PUT", f"/admin/nodes/{node}", {"draining": True})[0] == 200
    running.wait(lambda: len({body["state_seq"] for _, body in by_role(running).values()})
                 == 1, "the follower has the drains too")
    waits = {int(running.get("/get-tcp-ip")[1]["Retry-After"]) for _ in range(40)}
    assert min(waits) >= 30 and max(waits) <= 60, waits  # both workers: 30..60, not 2..4


def test_a_follower_says_at_once_that_the_leaders_log_failed(two_workers):
    running = two_workers
    assert by_role(running)["follower"][1]["event_log"] == "ok"
    # The disk fills up for the leader: its files may grow by 4 KiB more, no further.
    leader = int((running.tmp / "events" / "LOCK").read_text().split()[0])
    largest = max(path.stat().st_size for path in (running.tmp / "events").rglob("*")
                  if path.is_file())
    resource.prlimit(leader, resource.RLIMIT_FSIZE, (largest + 4096, largest + 4096))
    for weight in range(2, 500):  # each change a record, until the "disk" is full
        status, _, body = running.admin("PUT", "/admin/nodes/e2e1",
                                        {"weight": weight % 100 + 1})
        if status != 200:
            break
    else:
        pytest.fail("the log never filled up")
    failed = time.monotonic()
    assert status == 503, body
    answers = by_role(running)
    took = time.monotonic() - failed
    assert took < 1.5, took  # well inside stale_after (2 s): not from a stale poll
    for role, (status, ready) in answers.items():
        assert status == 503 and ready["event_log"] == "failed", (role, ready)
    assert "File too large" in answers["follower"][1]["reason"]
    assert running.get("/get-tcp-ip")[0] == 200  # clients still get the last state


def test_changes_racing_a_removal_answer_what_was_recorded(two_workers):
    running = two_workers
    seen = set()
    for round_ in range(30):
        node = f"race{round_}"
        add = {"id": node, "ip": "127.0.0.1", "port": 1}
        if round_ % 2:  # an add racing the removal of the node it adds
            first = ("POST", "/admin/nodes", add)
        else:  # a change racing the removal of its node
            assert running.admin("POST", "/admin/nodes", add)[0] == 201
            first = ("PUT", f"/admin/nodes/{node}", {"weight": 7})
        start = threading.Barrier(2)
        answers = {}

        def send(name, request, start=start, answers=answers):
            start.wait()
            answers[name] = running.admin(*request)

        threads = [threading.Thread(target=send, args=("change", first)),
                   threading.Thread(target=send,
                                    args=("remove", ("DELETE", f"/admin/nodes/{node}")))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        status, _, body = answers["change"]
        seen.add(status)
        kinds = {e["type"] for e in events(running) if e.get("node") == node}
        change = "node_added" if first[0] == "POST" else "node_weight_set"
        if status in (200, 201):
            assert body["id"] == node
        elif status == 409:  # recorded, then removed before the answer
            assert "removed" in body["error"] and body["recorded"][0]["type"] == change
        else:
            assert status == 404 and "unknown node" in body["error"], (status, body)
        assert (change in kinds) == (status != 404), (status, body, kinds)
        assert answers["remove"][0] in (200, 404), answers["remove"]
        if node in weights(running):  # the add came after the removal
            assert running.admin("DELETE", f"/admin/nodes/{node}")[0] == 200
    assert seen <= {200, 201, 404, 409}, seen


def test_dead_workers_are_replaced_and_keep_the_reloaded_settings(two_workers):
    running = two_workers
    text = running.config.read_text().replace("stale_after = 2.0\n", "stale_after = 3.5\n")
    running.config.write_text(text.replace("weight = 1\n", "weight = 5\n"))
    assert running.admin("POST", "/admin/reload")[0] == 200
    running.config.write_text(text)  # edited again, not reloaded: must not take effect
    lock = running.tmp / "events" / "LOCK"
    for kill in range(2):  # the leader, then the worker that took over from it
        leader = int(lock.read_text().split()[0])
        os.kill(leader, signal.SIGKILL)

        def replaced(leader=leader):
            pid = int((lock.read_text().split() or ["0"])[0])
            return pid != leader and by_role(running, timeout=5)

        running.wait(replaced, f"a new leader and a new worker (kill {kill + 1})", timeout=20)
        assert running.dispatcher.poll() is None
        assert running.get("/get-tcp-ip")[0] == 200
        assert {body["stale_after_s"] for _, body in by_role(running).values()} == {3.5}
    assert weights(running)["e2e3"] == 5
    running.dispatcher.terminate()
    assert running.dispatcher.wait(timeout=15) == 0


def test_a_follower_behind_the_leaders_last_cycle_is_not_ready(tmp_path):
    """It would answer from nodes whose health it does not know yet: 503s from a worker
    that said ready (seen at start, when the leader's first cycle lands)."""
    from types import SimpleNamespace

    from dispatcher import config as cfg
    from dispatcher import leader_link
    from dispatcher.follower import Follower

    config = cfg.parse(f'[eventlog]\npath = "{tmp_path}"\n')
    follower = Follower(config)
    leader = SimpleNamespace(config=config, nc=None, state=SimpleNamespace(seq=3))
    leader_link.write_status(leader)  # the leader's first cycle took it to seq 3
    follower.take_cycle()
    ready, details = follower.readiness()
    assert not ready and details["reason"] == "no poll cycle yet"
    follower.state.seq = 3  # (as if it had applied the three events)
    follower.take_cycle()
    ready, details = follower.readiness()
    assert ready, details


def test_a_follower_reads_the_tail_before_refusing_a_client(tmp_path):
    """The leader's first poll lands in the log a moment before the follower's 50 ms
    tail reads it: a client asking then must not get a 503 the log already disproves."""
    import asyncio

    from dispatcher import config as cfg
    from dispatcher.domain import decisions
    from dispatcher.eventlog.filelog import FileLog
    from dispatcher.follower import Follower
    from dispatcher.journal import Journal
    from dispatcher.query import DEFAULT

    async def run():
        config = cfg.parse(f'[eventlog]\npath = "{tmp_path}"\n')
        journal = Journal(FileLog(tmp_path))
        await journal.open()
        await journal.record(decisions.add_node(journal.state, "n1", "10.0.0.1", 9000,
                                                actor="config"))
        follower = Follower(config)
        await follower.start()
        try:
            assert follower.choose(DEFAULT) == []  # nobody knows n1's health yet
            await journal.record(decisions.mark_up(journal.state, "n1"))  # the first poll
            assert [node.id for node in follower.choose(DEFAULT)] == ["n1"]
        finally:
            await follower.stop()
            await journal.close()

    asyncio.run(run())


def test_workers_stop_when_their_supervisor_is_killed(tmp_path, nats_server):
    """SIGKILL leaves the supervisor no time to stop its workers: they stop by themselves,
    freeing the port and the event log, so the dispatcher can simply be started again;
    and no process it started outlives it (Sanic's multiprocessing manager did)."""
    running = Cluster(tmp_path, nats_server.url, workers=2)
    supervisor = running.dispatcher.pid
    children = [stat.parts[2] for stat in Path("/proc").glob("[0-9]*/stat")
                if _field(stat, 1) == str(supervisor)]
    try:
        lock = (tmp_path / "events" / "LOCK").resolve()
        assert _holders(lock)  # the leader (the follower holds the port with it)
        running.dispatcher.send_signal(signal.SIGKILL)
        running.dispatcher.wait()
        running.wait(lambda: not _holders(lock), "no worker holds the event log", timeout=20)
        running.wait(lambda: _bindable(running.http_port), "nobody holds the port")
        running.wait(lambda: not any(Path(f"/proc/{pid}").exists() and
                                     "Z" not in _state(pid) for pid in children),
                     f"every process the supervisor started ({len(children)}) is gone",
                     timeout=10)
    finally:
        running.stop()
        for pid in children:  # what outlived the supervisor: Sanic's manager process
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _bindable(port):
    """Whether a new `serve` could listen on the port (as Sanic binds it)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
    return True


def _holders(path):
    """Pids of the live processes that have `path` open."""
    pids = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if Path(os.readlink(fd)) == path and "Z" not in _state(fd.parts[2]):
                pids.add(fd.parts[2])
        except OSError:
            continue
    return pids


def _state(pid):
    return _field(Path(f"/proc/{pid}/stat"), 0) or "Z"


def _field(stat, index):
    """A field of /proc/PID/stat after the command's name (0: state, 1: parent pid)."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[index]
    except (OSError, IndexError):
        return None
