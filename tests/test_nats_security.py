"""NATS credentials and TLS for both programs, against a nats-server that requires them,
and the subject permissions that keep an intruder from faking a node's status."""

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import nats
import nkeys
import pytest

from tests.nats_server import NatsServer, free_port

ADMIN = "sec-token"
NODE_PERMISSIONS = """{
    publish: {allow: ["im.user.*.msg", "im.login", "imnode.n1.status"]}
    subscribe: {allow: ["imnode.n1.>", "im.user.*.msg", "im.login", "$SRV.>",
                        "_INBOX.imnode.n1.>"]}
    allow_responses: true
}"""


def server_with(tmp_path, config, name="js"):
    path = tmp_path / f"{name}.conf"
    path.write_text(config)
    return NatsServer(tmp_path / name, args=("-c", str(path)))


def nats_url(server, scheme="nats"):
    return f"{scheme}://127.0.0.1:{server.port}"


def admin_nodes(port):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/nodes",
                                     headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(request, timeout=2) as response:
        return {n["id"]: n for n in json.loads(response.read())}


@contextlib.contextmanager
def pair(tmp_path, url, nats_toml, node_args=(), node_env=None):
    """imnode n1 and the dispatcher with these credentials, running; yields a function
    that returns n1 as the dispatcher sees it, once it has judged it up."""
    node_port, http_port = free_port(), free_port()
    node = subprocess.Popen(
        [sys.executable, "-m", "imnode", "serve", "--id", "n1", "--listen",
         f"127.0.0.1:{node_port}", "--nats", url, "--capacity", "100", "--log-level",
         "warning", *node_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(node_env or {})})
    config = tmp_path / "dispatcher.toml"
    config.write_text(
        f"[http]\nport = {http_port}\n[nats]\nservers = [\"{url}\"]\n{nats_toml}"
        "[poll]\ninterval = 0.2\ntimeout = 0.15\nrise = 1\n"
        f'[eventlog]\npath = "{tmp_path / "events"}"\n'
        f'[[nodes]]\nid = "n1"\nip = "127.0.0.1"\nport = {node_port}\n')
    dispatcher = subprocess.Popen(
        [sys.executable, "-m", "dispatcher", "serve", "--config", str(config), "--log-level",
         "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "IMDISPATCH_ADMIN_TOKEN": ADMIN})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if admin_nodes(http_port)["n1"]["health"] == "up":
                    break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("n1 never came up through these credentials")
            time.sleep(0.1)
        yield lambda: admin_nodes(http_port)["n1"]
    finally:
        for process in (dispatcher, node):
            process.terminate()
        for process in (dispatcher, node):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def node_is_up_through(tmp_path, url, nats_toml, node_args=(), node_env=None):
    with pair(tmp_path, url, nats_toml, node_args, node_env) as n1:
        return n1()


def test_user_password_and_permissions_keep_intruders_out(tmp_path):
    config = f"""authorization {{
      users = [
        {{user: dispatcher, password: "d-secret"}}
        {{user: n1, password: "n1-secret", permissions: {NODE_PERMISSIONS}}}
        {{user: intruder, password: "i-secret", permissions: {{
            publish: {{deny: ["_INBOX.>", "imnode.>", "$SRV.>"]}}
            subscribe: {{deny: ["imnode.>", "$SRV.>"]}}
        }}}}
      ]
    }}"""
    with server_with(tmp_path, config) as server:
        url = nats_url(server)
        with pair(tmp_path, url, 'user = "dispatcher"\npassword = "d-secret"\n',
                  ["--nats-user", "n1"], {"IMNODE_NATS_PASSWORD": "n1-secret"}) as n1:
            assert n1()["capacity"] == 100

            async def intrude():
                with pytest.raises(Exception, match=r"(?i)authorization"):
                    await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0,
                                       allow_reconnect=False)
                errors = []

                async def on_error(exc):
                    errors.append(str(exc).lower())

                nc = await nats.connect(url, user="intruder", password="i-secret",
                                        error_cb=on_error)
                await nc.subscribe("imnode.n1.status")  # to answer in n1's place
                fake = (b'{"node_id":"n1","ip":"127.0.0.1","port":1,"connections":100,'
                        b'"capacity":100,"accepting":false,"draining":false,"cpu":0,'
                        b'"loop_lag_ms":0,"uptime_s":1,"version":"9","ts":1}')
                for _ in range(20):  # forged replies, while the dispatcher polls
                    await nc.publish("_INBOX.imdispatch.guess.1.n1", fake)
                    await asyncio.sleep(0.05)
                await nc.flush()
                await nc.close()
                return errors

            errors = asyncio.run(intrude())
            assert any("permissions violation" in e and "subscription" in e
                       and "imnode.n1.status" in e for e in errors), errors
            assert any("permissions violation" in e and "publish" in e for e in errors), errors
            time.sleep(0.5)  # a few more poll cycles
            seen = n1()
            assert seen["health"] == "up" and seen["connections"] == 0  # the real figures
            assert not seen["overloaded"]


def test_token(tmp_path):
    with server_with(tmp_path, 'authorization { token: "t0ken-secret" }') as server:
        n1 = node_is_up_through(tmp_path, nats_url(server), 'token = "t0ken-secret"\n',
                                node_env={"IMNODE_NATS_TOKEN": "t0ken-secret"})
        assert n1["health"] == "up"


def test_nkey_seed_files(tmp_path):
    seeds = {}
    for name in ("dispatcher", "node"):
        key = nkeys.from_seed(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
        seeds[name] = (key.public_key.decode(), key.seed.decode())
        (tmp_path / f"{name}.nk").write_text(seeds[name][1])
    config = ("authorization { users = [ "
              + ", ".join(f"{{nkey: {public}}}" for public, _ in seeds.values()) + " ] }")
    with server_with(tmp_path, config) as server:
        n1 = node_is_up_through(tmp_path, nats_url(server),
                                f'nkey_seed = "{tmp_path / "dispatcher.nk"}"\n',
                                ["--nats-nkey", str(tmp_path / "node.nk")])
        assert n1["health"] == "up"


def test_tls_with_a_private_ca(tmp_path):
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=imdispatch test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    config = (f'tls {{\n  cert_file: "{tmp_path / "server.pem"}"\n'
              f'  key_file: "{tmp_path / "server.key"}"\n}}')
    with server_with(tmp_path, config) as server:
        url = nats_url(server, "tls")
        n1 = node_is_up_through(tmp_path, url, f'tls_ca = "{tmp_path / "ca.pem"}"\n',
                                ["--nats-tls-ca", str(tmp_path / "ca.pem")])
        assert n1["health"] == "up"

        async def without_the_ca():  # a client that does not trust our CA is refused
            with pytest.raises(Exception, match=r"(?i)certificate|ssl|tls"):
                await nats.connect(url, connect_timeout=2, allow_reconnect=False,
                                   max_reconnect_attempts=0)

        asyncio.run(without_the_ca())
