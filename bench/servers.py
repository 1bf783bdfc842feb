"""The HTTP servers the get-tcp-ip benchmarks compare, all on 127.0.0.1, same request path:
the dispatcher (fast path on or off) in front of three imnodes, a bare Sanic route and,
when installed, nginx returning the same constant body.

Each `start_*` returns (port, process) once the server answers; stop them with
`bench.processes.stop`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from bench.bare_sanic import BODY
from bench.processes import start, start_dispatcher, start_imnode, stop, wait_ready
from tests.nats_server import free_port

PATH = "/get-tcp-ip"
REQUEST = f"{PATH}?uid=bench"


def start_nodes(nats_url: str, count: int = 3) -> tuple[dict[str, tuple[int, int]],
                                                       list[subprocess.Popen]]:
    """`count` imnodes: ({id: (port, weight)}, processes)."""
    ports = {f"b{i}": free_port() for i in range(count)}
    processes = []
    try:
        for node_id, port in ports.items():
            processes.append(start_imnode(node_id, port, nats_url, 100000))
    except BaseException:
        stop(*processes)
        raise
    return {n: (p, i + 1) for i, (n, p) in enumerate(ports.items())}, processes


def start_get_tcp_ip(directory: Path, nats_url: str, nodes: dict[str, tuple[int, int]], *,
                     workers: int, fast_path: bool,
                     interval: float = 0.5,
                     eventlog: str | None = None) -> tuple[int, subprocess.Popen]:
    """The dispatcher over `nodes`, pacing off (every request is answered 200);
    `eventlog` as `bench.processes.dispatcher_config` takes it."""
    directory = directory / f"fast-{str(fast_path).lower()}"
    directory.mkdir(parents=True, exist_ok=True)
    return start_dispatcher(directory, nats_url, nodes, workers=workers, interval=interval,
                            balance="slow_start = 0\nassign_rate = 1000000000\n",
                            http=f"fast_path = {str(fast_path).lower()}\n",
                            eventlog=eventlog)


def start_bare_sanic(workers: int) -> tuple[int, subprocess.Popen]:
    port = free_port()
    process = start([sys.executable, "-m", "bench.bare_sanic", str(port), str(workers)])
    try:
        wait_ready(f"http://127.0.0.1:{port}{PATH}")
    except BaseException:
        stop(process)
        raise
    return port, process


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
         if Path(path).is_file()), None)


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port};
        location = {path} {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def start_nginx(directory: Path, workers: int) -> tuple[int, subprocess.Popen]:
    """nginx answering `PATH` with the bare route's body: a non-daemon child with its own
    prefix, configuration and logs in `directory`, `workers` worker processes."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed")
    prefix = directory / f"nginx-{workers}"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, prefix=prefix, port=port, path=PATH,
                                      body=BODY.decode()))
    process = start([binary, "-p", str(prefix), "-e", str(prefix / "error.log"),
                     "-c", str(conf)])
    try:
        wait_ready(f"http://127.0.0.1:{port}{PATH}", timeout=10)
    except BaseException:
        stop(process)
        raise
    return port, process
