"""Real processes for the scenarios: imnodes, the dispatcher, helpers to wait and stop.

Everything listens on 127.0.0.1 only; every wait is bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.nats_server import free_port


def start(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def stop(*processes: subprocess.Popen) -> None:
    """SIGTERM all, then wait for each; SIGKILL what does not stop in 15 s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_imnode(node_id: str, port: int, nats_url: str, capacity: int,
                 *options: str) -> subprocess.Popen:
    process = start([sys.executable, "-m", "imnode", "serve", "--id", node_id, "--listen",
                     f"127.0.0.1:{port}", "--nats", nats_url, "--capacity", str(capacity),
                     "--log-level", "warning", *options])
    if not process.stdout.readline().startswith(f"imnode {node_id} listening"):
        stop(process)
        raise AssertionError(f"imnode {node_id} did not start")
    return process


def wait_ready(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered 200")


def dispatcher_config(directory: Path, nats_url: str, nodes: dict[str, tuple[int, int]],
                      *, workers: int = 1, interval: float = 0.5, balance: str = "",
                      http: str = "", eventlog: str | None = None) -> tuple[int, Path]:
    """The config file of `imdispatch serve` for nodes {id: (port, weight)}: (its HTTP
    port, its path). `eventlog`: the body of its `[eventlog]` table (default: a file log
    in `directory`)."""
    if eventlog is None:
        eventlog = f'path = "{directory / f"events-{workers}"}"\n'
    http_port = free_port()
    config = directory / f"dispatcher-{workers}.toml"
    config.write_text(
        f"[http]\nport = {http_port}\nworkers = {workers}\n{http}"
        f'[nats]\nservers = ["{nats_url}"]\n'
        f"[poll]\ninterval = {interval}\ntimeout = {interval / 2}\nrise = 1\n"
        f"[balance]\n{balance}"
        f"[eventlog]\n{eventlog}"
        + "".join(f'[[nodes]]\nid = "{n}"\nip = "127.0.0.1"\nport = {port}\nweight = {w}\n'
                  for n, (port, w) in nodes.items()))
    return http_port, config


def serve(config: Path, log: Path | None = None) -> subprocess.Popen:
    """`imdispatch serve --config config`, admin token `bench`, at once (not waited for);
    with `log`, its log at info level goes there."""
    argv = [sys.executable, "-m", "dispatcher", "serve", "--config", str(config),
            "--log-level", "warning" if log is None else "info"]
    env = {**os.environ, "IMDISPATCH_ADMIN_TOKEN": "bench"}
    if log is None:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    with open(log, "ab") as stderr:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env=env)


def start_dispatcher(directory: Path, nats_url: str, nodes: dict[str, tuple[int, int]],
                     **options: object) -> tuple[int, subprocess.Popen]:
    """`imdispatch serve` (`options`: those of `dispatcher_config`); returns its HTTP port
    once ready."""
    http_port, config = dispatcher_config(directory, nats_url, nodes, **options)
    dispatcher = serve(config)
    try:
        assert dispatcher.stdout.readline().startswith("imdispatch serving")
        wait_ready(f"http://127.0.0.1:{http_port}/readyz")
    except BaseException:
        stop(dispatcher)
        raise
    return http_port, dispatcher
