"""The dashboard's screenshot for the report: a small live cluster (traffic, a node
killed, a weight changed), photographed by headless chromium. Loopback only."""

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from bench.processes import start_dispatcher, start_imnode, stop
from dispatcher.stats import WRITE_EVERY
from tests.nats_server import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def call(url, method="GET", body=None):
    request = urllib.request.Request(url, method=method, headers={
        "Authorization": "Bearer bench"}, data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: apt-get install chromium")
def test_dashboard_screenshot(benchmark, tmp_path, nats_url, request):
    benchmark.group = "dashboard"
    figures = request.config.getoption("--bench-figures")
    picture = Path(figures).with_name("dashboard.png") if figures else tmp_path / "dashboard.png"
    ports = {f"d{i}": free_port() for i in range(1, 4)}
    running = []
    try:
        for node, port in ports.items():
            running.append(start_imnode(node, port, nats_url, 1000))
        http_port, dispatcher = start_dispatcher(
            tmp_path, nats_url, {n: (p, 4 - i) for i, (n, p) in enumerate(ports.items())},
            workers=2, balance="slow_start = 5\n")
        running.append(dispatcher)
        url = f"http://127.0.0.1:{http_port}"
        for _ in range(30):  # a few seconds of traffic, a failure and an admin change
            for _ in range(20):
                urllib.request.urlopen(f"{url}/get-tcp-ip?uid=shot", timeout=5).read()
            time.sleep(0.1)
        running[2].kill()
        call(f"{url}/admin/nodes/d1", "PUT", {"weight": 5, "reason": "bigger machine"})
        time.sleep(WRITE_EVERY + 1)

        def photograph():
            subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", f"--screenshot={picture}",
                            "--window-size=1280,1000", "--virtual-time-budget=4000",
                            f"{url}/dashboard"], capture_output=True, timeout=90, check=True)

        benchmark.pedantic(photograph, rounds=1, iterations=1)
    finally:
        stop(*running)
    assert picture.read_bytes().startswith(b"\x89PNG")
