"""Local and admin surfaces (issue 13), against real processes: the workers' admin socket
is the service's own whatever the umask, and a node address no client can connect to is
refused by the admin API, by imnode's --advertise, and in a NATS status reply."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import test_hostile_input
from tests.test_dispatcher_e2e import WEIGHTS, Cluster
from tests.test_hostile_input import FakeNodes, status
from tests.test_workers import by_role, events

NOBODY = 65534  # uid and gid of `nobody` / `nogroup`
SEND = """
import json, socket, sys
client = socket.socket(socket.AF_UNIX)
try:
    client.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"refused": type(exc).__name__}))
    sys.exit()
try:  # a refused peer may be answered and closed before it has sent a byte
    client.sendall(json.dumps({"op": "remove", "args": {"node_id": "e2e1"},
                               "actor": "admin:forged"}).encode() + b"\\n")
except (BrokenPipeError, ConnectionResetError):
    pass
print(client.makefile().readline().strip() or '{"closed": true}')
"""
UNREACHABLE = {  # node id -> an address no phone can connect to
    "multicast": "224.0.0.1", "unspecified4": "0.0.0.0", "unspecified6": "::",
    "broadcast": "255.255.255.255", "mapped": "::ffff:224.0.0.1",
    "scoped": "fe80::1%" + "x" * 60_000,
}


def as_nobody(path):
    """What a process running as `nobody` gets when it sends a removal to `path`."""
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-I", "-c", SEND, str(path)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def world_readable_dir():
    """A directory `nobody` can reach (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="imdispatch-local-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_the_admin_socket_is_the_services_own_whatever_the_umask(
        world_readable_dir, nats_server):
    log_file = world_readable_dir / "dispatcher.log"
    umask = os.umask(0)  # inherited by `imdispatch serve`: the case that let `nobody` in
    try:
        running = Cluster(world_readable_dir, nats_server.url, workers=2, log_file=log_file)
    finally:
        os.umask(umask)
    directory = world_readable_dir / "events"
    socket_path = directory / "admin.sock"
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        by_role(running)
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        for path in [directory, *directory.rglob("*")]:  # nobody else writes the log
            assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH), path
        assert as_nobody(socket_path) == {"refused": "PermissionError"}

        with socket.socket(socket.AF_UNIX) as own:  # the service's uid is served
            own.connect(str(socket_path))
            own.sendall(b'{"op": "nodes", "args": {}, "actor": "test"}\n')
            assert json.loads(own.makefile().readline())["status"] == 200

        socket_path.chmod(0o666)  # loosened by hand: the peer's uid is still checked
        reply = as_nobody(socket_path)
        assert reply["status"] == 403 and f"uid {NOBODY}" in reply["body"]["error"], reply
        assert set(running.health()) == set(WEIGHTS)  # e2e1 was not removed
        refusals = [json.loads(line)["message"] for line in log_file.read_text().splitlines()
                    if "refused pid" in line]
        assert len(refusals) == 1 and f"running as uid {NOBODY}" in refusals[0]

        for weight in range(4, 10):  # through both workers: the follower forwards them
            assert running.admin("PUT", "/admin/nodes/e2e2", {"weight": weight})[0] == 200
        changes = [e for e in events(running) if e["type"] == "node_weight_set"]
        assert len(changes) == 6 and {e["actor"] for e in changes} == {"admin:ops"}
    finally:
        running.stop()
    assert not socket_path.exists()


def test_the_status_file_is_never_written_through_a_link(tmp_path, nats_server):
    """The leader's STATUS goes to STATUS.tmp, then is renamed: a link found at that name
    (planted, or left) is replaced, never written through (root would clobber its
    target)."""
    events = tmp_path / "events"
    events.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("ORIGINAL\n")
    (events / "STATUS.tmp").symlink_to(victim)
    running = Cluster(tmp_path, nats_server.url)
    status = events / "STATUS"

    def cycle():
        return json.loads(status.read_text())["last_cycle"] if status.exists() else 0

    try:
        running.wait(cycle, "the leader wrote its status")
        first = cycle()
        running.wait(lambda: cycle() > first, "the leader wrote its status again")
        assert not status.is_symlink() and not (events / "STATUS.tmp").is_symlink()
    finally:
        running.stop()
    assert victim.read_text() == "ORIGINAL\n"


def test_unreachable_addresses_are_refused_by_the_admin_api_and_in_status_replies(
        tmp_path, nats_server, monkeypatch):
    monkeypatch.setattr(test_hostile_input, "FAKES", {
        node: (status(node, ip=ip), "bad_reply") for node, ip in UNREACHABLE.items()})
    fakes = FakeNodes(nats_server.url)
    fakes.start()
    assert fakes.ready.wait(10)
    running = Cluster(tmp_path, nats_server.url)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        for port, (node, ip) in enumerate(UNREACHABLE.items(), start=20000):
            code, _, body = running.admin("POST", "/admin/nodes",
                                          {"id": node, "ip": ip, "port": port})
            assert code == 400 and "ip must be a unicast address" in body["error"], body
            assert len(body["error"]) < 400  # a 60 kB scope id is not repeated
            code, _, body = running.admin("PUT", "/admin/nodes/e2e1", {"ip": ip})
            assert code == 400 and "ip must be a unicast address" in body["error"], body
            # the fake node itself, added where it can be reached, replies with `ip`
            assert running.admin("POST", "/admin/nodes", {"id": node, "ip": "127.0.0.2",
                                                          "port": port})[0] == 201

        def judged():
            nodes = {n["id"]: n for n in running.admin("GET", "/admin/nodes")[2]}
            return all(nodes[node]["health"] == "down" for node in UNREACHABLE) and nodes

        running.wait(judged, "every node replying an unreachable address is down",
                     timeout=20)
        nodes = judged()
        for node in UNREACHABLE:
            assert nodes[node]["health_cause"] == "bad_reply", nodes[node]
            assert "`ip` must be a unicast address" in nodes[node]["health_detail"]
            assert len(nodes[node]["health_detail"]) < 400
        assert nodes["e2e1"]["ip"] == "127.0.0.1"
        assert all(nodes[node]["health"] == "up" for node in WEIGHTS)
    finally:
        running.stop()
        fakes.stop()


@pytest.mark.parametrize(("arguments", "message"), [
    (["--listen", "127.0.0.1:0", "--advertise", "224.0.0.1:9000"], "(multicast)"),
    (["--listen", "127.0.0.1:0", "--advertise", "[::]:9000"], "unspecified"),
    (["--listen", "127.0.0.1:0", "--advertise", "[fe80::1%eth0]:9000"], "scope id"),
    (["--listen", "0.0.0.0:0"], "--advertise IP:PORT is needed"),
    (["--listen", "[ff02::1]:0"], "--advertise IP:PORT is needed: the --listen address"),
])
def test_imnode_will_not_advertise_an_address_no_client_can_connect_to(arguments, message):
    result = subprocess.run(
        [sys.executable, "-m", "imnode", "serve", "--id", "n1", *arguments, "--nats",
         "nats://127.0.0.1:1", "--capacity", "10"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[-1], result.stderr
