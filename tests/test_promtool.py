"""Both programs' /metrics pass `promtool check metrics` (Prometheus's own linter: names,
units, types, help), scraped from a real imnode and a real `imdispatch serve` that have
served clients over HTTP and NATS, so every labelled family has samples."""

import shutil
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.nats_server import free_port, run_with_client
from tests.test_dispatcher_e2e import Cluster

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian ships it in the "
    "'prometheus' package; .ci/run installs it)")


def promtool_says(text):
    """promtool's complaints about an exposition: empty when it has none."""
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                             capture_output=True, timeout=30)
    said = (checked.stdout + checked.stderr).decode().strip()
    return said or ("" if checked.returncode == 0 else f"exit {checked.returncode}")


def metrics(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_an_imnodes_metrics_pass_promtool_in_base_units(nats_server):
    port = free_port()
    node = subprocess.Popen(
        [sys.executable, "-m", "imnode", "serve", "--id", "prom1", "--listen", "127.0.0.1:0",
         "--nats", nats_server.url, "--capacity", "10", "--log-level", "warning",
         "--metrics-listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout.readline().startswith("imnode prom1 listening")
        text = metrics(f"http://127.0.0.1:{port}/metrics")
    finally:
        node.kill()  # how it stops is not the point here
        node.wait()
    assert promtool_says(text) == ""
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"imnode_loop_lag_seconds", "imnode_uptime_seconds"} <= names
    assert not {"imnode_loop_lag_ms", "imnode_uptime_s"} & names


@pytest.mark.parametrize("workers", [1, 2])
def test_the_dispatchers_metrics_pass_promtool(tmp_path, nats_server, workers):
    cluster = Cluster(tmp_path, nats_server.url, workers=workers)
    try:
        cluster.wait(lambda: set(cluster.health().values()) == {"up"}, "every node is up")
        assert cluster.get("/get-tcp-ip?uid=prom")[0] == 200
        assert cluster.get("/get-tcp-ip?count=99")[0] == 400

        async def pick(nc):
            return await nc.request("imdispatch.pick", b'{"uid": "prom"}', timeout=5)

        assert b'"node"' in run_with_client(nats_server.url, pick).data
        found = {}

        def counted():  # the workers write their figures every second
            found["text"] = metrics(cluster.url("/metrics"))
            return "imdispatch_assignments_total{" in found["text"]

        cluster.wait(counted, "the assignment is counted")
    finally:
        cluster.stop()
    assert promtool_says(found["text"]) == ""
