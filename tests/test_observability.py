"""/metrics and /dashboard against the real dispatcher (two workers), the dashboard in a
real headless browser, and the per-worker figures they are made of."""

import os
import re
import shutil
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher import stats as worker_stats
from tests.test_dispatcher_e2e import TOKEN, WEIGHTS, Cluster

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def scrape(cluster):
    with urllib.request.urlopen(cluster.url("/metrics"), timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):  # fails on a malformed exposition
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def two_workers(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url, workers=2)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        yield running
    finally:
        running.stop()


def scraped(cluster, condition, what):
    """The scrape, once `condition(samples)` holds (the workers write every second)."""
    found = {}

    def check():
        found["samples"] = scrape(cluster)
        return condition(found["samples"])

    cluster.wait(check, what, timeout=10)
    return found["samples"]


def test_metrics_add_up_across_workers(two_workers):
    for _ in range(120):
        assert two_workers.get("/get-tcp-ip?uid=m1")[0] == 200
    assert two_workers.get("/get-tcp-ip?count=9")[0] == 400
    assert two_workers.get("/no-such-page")[0] == 404
    samples = scraped(two_workers, lambda samples: value(
        samples, "imdispatch_http_requests_total", route="/get-tcp-ip", status="200") == 120,
        "every worker's figures are in")  # never more: the exact sum
    time.sleep(worker_stats.WRITE_EVERY + 0.2)  # and it stays exact
    samples = scrape(two_workers)
    assert value(samples, "imdispatch_http_requests_total", route="/get-tcp-ip",
                 status="200") == 120
    assert value(samples, "imdispatch_http_requests_total", route="/get-tcp-ip",
                 status="400") == 1
    assert value(samples, "imdispatch_http_requests_total", route="other", status="404") == 1
    assigned = {node: value(samples, "imdispatch_assignments_total", node=node, via="http")
                for node in WEIGHTS}
    assert sum(assigned.values()) == 120
    assert value(samples, "imdispatch_get_tcp_ip_seconds_count") == 120
    assert value(samples, "imdispatch_get_tcp_ip_seconds_bucket", le="+Inf") == 120
    assert value(samples, "imdispatch_workers") == 2
    assert value(samples, "imdispatch_ready") == 1
    assert value(samples, "imdispatch_nats_connected") == 1
    assert value(samples, "imdispatch_poll_cycle_seconds_count") >= 1
    assert value(samples, "imdispatch_eventlog_appends_total") >= len(WEIGHTS)
    for node, weight in WEIGHTS.items():
        assert value(samples, "imdispatch_node_weight", node=node) == weight
        assert value(samples, "imdispatch_node_health", node=node, state="up") == 1
        assert value(samples, "imdispatch_node_capacity", node=node) == two_workers.capacity
    two_workers.nodes["e2e3"].kill()
    two_workers.wait(lambda: two_workers.health()["e2e3"] == "down", "e2e3 is down")
    samples = scraped(two_workers, lambda samples: (value(
        samples, "imdispatch_poll_failures_total", cause="no_responders") or 0) >= 1,
        "the leader's failure count is in")
    assert value(samples, "imdispatch_node_health", node="e2e3", state="down") == 1


def dump_dom(cluster, path="/dashboard"):
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--dump-dom", "--virtual-time-budget=4000", cluster.url(path)],
        capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: apt-get install chromium")
def test_dashboard_shows_the_live_cluster_in_a_real_browser(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        for _ in range(12):
            running.get("/get-tcp-ip")
        dom = dump_dom(running)
        for node in WEIGHTS:
            assert re.search(rf'<tr data-node="{node}"><td>{node}</td>.*?health up', dom), node
        assert 'class="good">ready<' in dom and "NATS connected" in dom
        assert 'data-type="node_up"' in dom
        assert '<div id="error"></div>' in dom  # the data came
        # a fresh change appears, and the table follows it
        assert running.admin("PUT", "/admin/nodes/e2e2", {"weight": 9, "reason": "bigger"}
                             )[0] == 200
        running.nodes["e2e3"].kill()
        running.wait(lambda: running.health()["e2e3"] == "down", "e2e3 is down")
        dom = dump_dom(running)
        assert re.search(r'data-type="node_weight_set">#\d+ .*? node_weight_set e2e2 by '
                         r'admin:ops \(bigger\) weight=9', dom)
        assert re.search(r'<tr data-node="e2e2">.*?<td class="num">9</td>', dom)
        assert re.search(r'<tr data-node="e2e3">.*?health down', dom)
        assert 'data-type="node_down"' in dom
        dom = dump_dom(running, "/dashboard/")  # with a trailing slash, the data comes too
        assert '<tr data-node="e2e1">' in dom and '<div id="error"></div>' in dom
        if os.environ.get("IMDISPATCH_SCREENSHOT"):  # the bench report's screenshot step
            subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                            f"--screenshot={os.environ['IMDISPATCH_SCREENSHOT']}",
                            "--window-size=1280,900", "--virtual-time-budget=4000",
                            running.url("/dashboard")], capture_output=True, timeout=90,
                           check=True)
    finally:
        running.stop()


def test_dashboard_data_is_json_and_read_only(two_workers):
    with urllib.request.urlopen(two_workers.url("/dashboard/data"), timeout=5) as response:
        assert response.headers["Content-Type"] == "application/json"
    request = urllib.request.Request(two_workers.url("/dashboard/data"), method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 405
    assert TOKEN.split(":")[1] not in urllib.request.urlopen(
        two_workers.url("/dashboard"), timeout=5).read().decode()


def test_worker_figures_merge_into_sums():
    a, b = worker_stats.WorkerStats(), worker_stats.WorkerStats()
    a.picked("n1", 30e-6)
    a.picked(None, 1e-3)
    b.picked("n1", 2.0)
    b.picked("n2", 40e-6)
    b.request("/readyz", 503)
    a.tick(100.0)
    b.tick(100.0)
    a.picked("n2", 1e-6)
    a.tick(101.0)
    total = worker_stats.merge([a.as_dict(), b.as_dict()])
    assert total["workers"] == 2
    assert total["requests"] == {("/get-tcp-ip", 200): 4, ("/get-tcp-ip", 503): 1,
                                 ("/readyz", 503): 1}
    assert total["assignments"] == {"n1": 2, "n2": 2}
    assert sum(total["latency"]["counts"]) == 5 and total["latency"]["counts"][-1] == 1
    assert total["latency"]["sum"] == pytest.approx(2.001071)
    assert total["history"] == {100: {"n1": 2, "n2": 1}, 101: {"n2": 1}}


def test_stats_files_are_shared_and_survive_a_dead_worker(tmp_path):
    shared = worker_stats.SharedStats(tmp_path)
    shared.own.picked("n1", 1e-4)
    (tmp_path / "worker-99999999.json").write_bytes(  # a worker that wrote, then died
        __import__("orjson").dumps(worker_stats.WorkerStats().as_dict() | {
            "assignments": {"n1": 5}, "requests": [["/get-tcp-ip", 200, 5]]}))
    (tmp_path / "worker-1.json").write_text("{not json")  # torn: skipped, not fatal
    (tmp_path / "worker-2.json").write_bytes(  # another version: other buckets
        __import__("orjson").dumps(worker_stats.WorkerStats().as_dict() | {
            "latency": {"bounds": [1.0], "counts": [1, 1], "sum": 1.0}}))
    total = shared.everyone(shared.own.as_dict())
    assert total["assignments"] == {"n1": 6} and total["workers"] == 2
    assert (tmp_path / f"worker-{os.getpid()}.json").exists()  # written before the sum
