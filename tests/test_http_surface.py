"""The dispatcher's HTTP surface as load balancers and operators meet it, against a real
`imdispatch serve`: the admin side on a port of its own (`[http] admin_listen`), 405s
that say what is allowed, HEAD health checks, and a taken port at start."""

import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from dispatcher import config as cfg
from tests.nats_server import free_port
from tests.test_dispatcher_e2e import TOKEN, Cluster

SECRET = TOKEN.split(":")[1]
ADMIN_SIDE = ("/metrics", "/dashboard", "/dashboard/data", "/admin/nodes", "/admin/events")
WRONG_METHOD = (("PUT", "/admin/nodes"), ("DELETE", "/admin/events"), ("HEAD", "/metrics"),
                ("POST", "/dashboard/data"), ("GET", "/admin/reload"),
                ("OPTIONS", "/admin/nodes"))


def fetch(port, path, method="GET", token=None, body=None):
    """(status, headers, body bytes) of one request to 127.0.0.1:`port`."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=body)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.parametrize("workers", [1, 2])
def test_admin_listen_moves_the_admin_side_off_the_public_port(tmp_path, nats_server,
                                                               workers):
    admin = free_port()
    running = Cluster(tmp_path, nats_server.url, workers=workers,
                      http_extra=f'admin_listen = "127.0.0.1:{admin}"\n')
    try:
        public = running.http_port
        for _ in range(3 * workers):  # each worker serves both ports
            for path in ADMIN_SIDE:
                code, _, body = fetch(public, path, token=SECRET)
                unknown = fetch(public, path + "-nosuch", token=SECRET)
                assert code == 404 == unknown[0], (path, code, body)
                assert body == unknown[2].replace(b"-nosuch", b"")  # as an unknown path
                assert fetch(admin, path, token=SECRET)[0] == 200, path
            assert fetch(public, "/admin/nodes", "POST", SECRET, b'{"id": "x"}')[0] == 404
            for method, path in WRONG_METHOD:  # a 405 with Allow told the path was there
                code, headers, body = fetch(public, path, method, SECRET)
                unknown = fetch(public, path + "-nosuch", method, SECRET)
                assert code == 404 == unknown[0] and "Allow" not in headers, (method, path)
                assert body == unknown[2].replace(b"-nosuch", b""), (method, path, body)
                code, headers, _ = fetch(admin, path, method, SECRET)
                assert code == 405 and headers["Allow"], (method, path, code)
            assert fetch(admin, "/admin/nodes", token="wrong")[0] == 401
            assert fetch(public, "/get-tcp-ip")[0] == 200
            assert fetch(public, "/readyz")[0] == 200
        code, _, _ = fetch(admin, "/admin/nodes", "POST", SECRET,
                           b'{"id": "viaadmin", "ip": "127.0.0.1", "port": 20001}')
        assert code == 201  # the leader records it, whichever worker took it
    finally:
        running.stop()
    # stopped by itself, every worker (a stop that hangs is killed after 10 s: -9)
    assert running.dispatcher.returncode == 0


def test_405_says_what_is_allowed_and_health_checks_answer_head(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url)
    try:
        port = running.http_port
        for path, allowed in (("/healthz", {"GET", "HEAD"}), ("/readyz", {"GET", "HEAD"}),
                              ("/get-tcp-ip", {"GET"})):
            code, headers, body = fetch(port, path, "POST", body=b"")
            assert code == 405 and b"error" in body, (path, code)
            assert set(headers["Allow"].replace(" ", "").split(",")) == allowed, headers
        for path in ("/healthz", "/readyz"):
            get = fetch(port, path)
            head = fetch(port, path, "HEAD")
            assert head[0] == get[0] == 200 and head[2] == b""
            assert int(head[1]["content-length"]) > 0  # /readyz's length varies by a digit
        assert fetch(port, "/healthz", "HEAD")[1]["content-length"] == str(
            len(fetch(port, "/healthz")[2]))
    finally:
        running.stop()


def serve(tmp_path, workers, port, admin_listen=None):
    config = tmp_path / f"taken-{workers}.toml"
    config.write_text(
        f"[http]\nport = {port}\nworkers = {workers}\n"
        + (f'admin_listen = "{admin_listen}"\n' if admin_listen else "")
        + f'[eventlog]\npath = "{tmp_path / f"events-{workers}"}"\n'
        '[[nodes]]\nid = "n1"\nip = "127.0.0.1"\nport = 9001\n')
    return subprocess.run([sys.executable, "-m", "dispatcher", "serve", "--config",
                           str(config)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_port_is_one_line_and_exit_code_2(tmp_path, workers):
    holder = socket.create_server(("127.0.0.1", 0))
    taken = holder.getsockname()[1]
    try:
        for port, admin, setting in ((taken, None, "[http] port"),
                                     (free_port(), f"127.0.0.1:{taken}",
                                      "[http] admin_listen")):
            done = serve(tmp_path, workers, port, admin)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2, done.stderr
            assert lines[-1].startswith("imdispatch serve: "), done.stderr
            assert f"127.0.0.1:{taken} ({setting})" in lines[-1], lines[-1]
            assert "in use" in lines[-1] and "Traceback" not in done.stderr
            assert "imdispatch serving" not in done.stdout
    finally:
        holder.close()


@pytest.mark.parametrize(("value", "problem"), [
    ('"127.0.0.1"', "HOST:PORT"), ('"localhost:9090"', "IP address"),
    ('"127.0.0.1:0"', "1-65535"), ('"::1:9090"', "[::1]:9090"), ("9090", "HOST:PORT"),
    ('"127.0.0.1:8080"', "must not be the public port"),
])
def test_admin_listen_is_checked_with_key_and_line(value, problem):
    with pytest.raises(cfg.ConfigError) as refused:
        cfg.parse(f"[http]\nport = 8080\nadmin_listen = {value}\n", "d.toml")
    assert str(refused.value).startswith("d.toml:3: [http] admin_listen: "), refused.value
    assert problem in str(refused.value)
    assert cfg.parse('[http]\nadmin_listen = "[::1]:9090"\n').http.admin_address() == (
        "::1", 9090)
