#!/usr/bin/env python3
"""Record the order in which a real nginx picks weighted upstream peers.

nginx's default upstream balancing is smooth weighted round-robin
(``ngx_http_upstream_get_peer``), which `core_ext.Selector` claims to reproduce exactly.
This script asks nginx itself, so the claim is checked against the real thing:

* one nginx (``worker_processes 1``, so a single peer state; ``daemon off``) runs from a
  temporary prefix that holds its config, pid file, error log and temp paths, and listens
  on free loopback ports only;
* every weight set gets its own ``upstream`` block of ``server 127.0.0.1:PORT weight=W``
  lines in the order given; each of those backends is a server block of the same nginx
  that answers ``return 200 "<name>"``;
* a front server ``proxy_pass``es ``/u<N>`` to upstream N, with ``proxy_next_upstream
  off`` and ``max_fails=0`` so that nothing but the weights steers the choice;
* requests are sent one at a time and the body of each answer names the peer nginx chose.

Run it to refresh ``nginx_order.json`` beside it::

    python tests/data/record_nginx_order.py [--nginx /usr/sbin/nginx] [--output FILE]

Tests import `record` to compare a fresh recording with the selector.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

HOST = "127.0.0.1"  # loopback only, always
MAX_PICKS = 300
START_TIMEOUT = 10.0  # seconds for nginx to start answering
STOP_TIMEOUT = 10.0  # seconds for a graceful stop before nginx is killed
REQUEST_TIMEOUT = 5.0

# Upstream order is the dict order: ties go to the peer listed first.
CASES: list[dict[str, int]] = [
    {"a": 5, "b": 1, "c": 1},  # nginx's documented example: a a b a c a a
    {"a": 1, "b": 1, "c": 1},  # all tied
    {"a": 3, "b": 2},
    {"a": 2, "b": 3},  # same weights, the heavier one listed second
    {"a": 1, "b": 10, "c": 3, "d": 7},
    {"a": 7, "b": 7, "c": 1},  # a tie between the two heavy peers
    {"a": 100, "b": 1},  # weight 1 against a big weight
    {"a": 1, "b": 100},  # ... listed first
    {"a": 4, "b": 4, "c": 2, "d": 2},  # pairs of ties
    {"a": 1, "b": 150, "c": 1},  # capped at MAX_PICKS
]

_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
# Modules whose temp path nginx creates at start-up unless told where (compiled-in paths
# are outside the prefix, e.g. /var/lib/nginx/...); a module built out has no directive.
_TEMP_PATHS = {
    "client_body_temp_path": None,
    "proxy_temp_path": "--without-http_proxy_module",
    "fastcgi_temp_path": "--without-http_fastcgi_module",
    "uwsgi_temp_path": "--without-http_uwsgi_module",
    "scgi_temp_path": "--without-http_scgi_module",
}


def find_nginx() -> str | None:
    """The nginx binary on PATH, else /usr/sbin/nginx, else None."""
    found = shutil.which("nginx")
    if found:
        return found
    fallback = "/usr/sbin/nginx"
    return fallback if os.access(fallback, os.X_OK) else None


def nginx_version(nginx_binary: str) -> str:
    """'1.22.1' for a binary that says 'nginx version: nginx/1.22.1'."""
    out = subprocess.run(
        [nginx_binary, "-v"], capture_output=True, text=True, timeout=10, check=True
    )
    text = out.stderr + out.stdout
    match = re.search(r"nginx/(\S+)", text)
    return match.group(1) if match else text.strip()


def default_picks(weights: Mapping[str, int]) -> int:
    """Two full rounds (2 * sum of weights), at most MAX_PICKS."""
    return min(2 * sum(weights.values()), MAX_PICKS)


def _check(weight_sets: Sequence[Mapping[str, int]]) -> None:
    if not weight_sets:
        raise ValueError("no weight set to record")
    for weights in weight_sets:
        if not weights:
            raise ValueError("a weight set needs at least one peer")
        for name, weight in weights.items():
            if not _NAME.match(name):
                raise ValueError(f"peer name {name!r} must match {_NAME.pattern}")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
                raise ValueError(f"nginx weights are integers >= 1, got {name}={weight!r}")


def _free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _config(
    prefix: Path,
    nginx_binary: str,
    front: int,
    upstreams: Sequence[Sequence[tuple[str, int, int]]],
) -> str:
    built = subprocess.run(
        [nginx_binary, "-V"], capture_output=True, text=True, timeout=10, check=True
    )
    build_flags = built.stderr + built.stdout
    temp = "".join(
        f"    {directive} {prefix / directive};\n"
        for directive, without in _TEMP_PATHS.items()
        if without is None or without not in build_flags
    )
    blocks, backends, locations = [], [], []
    for index, peers in enumerate(upstreams):
        servers = "".join(
            # max_fails=0: no failure accounting can ever take a peer out of the rotation.
            f"        server {HOST}:{port} weight={weight} max_fails=0;\n"
            for _, weight, port in peers
        )
        blocks.append(f"    upstream u{index} {{\n{servers}    }}\n")
        backends.extend(
            f'    server {{ listen {HOST}:{port}; return 200 "{name}"; }}\n'
            for name, _, port in peers
        )
        locations.append(
            f"        location = /u{index} {{\n"
            f"            proxy_pass http://u{index};\n"
            f"            proxy_next_upstream off;\n"
            f"        }}\n"
        )
    return (
        "worker_processes 1;\n"
        "daemon off;\n"
        "master_process on;\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} notice;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        "    access_log off;\n"
        "    default_type text/plain;\n"
        f"{temp}"
        f"{''.join(blocks)}"
        f"{''.join(backends)}"
        "    server {\n"
        f"        listen {HOST}:{front};\n"
        '        location = /ready { return 200 "ready"; }\n'
        f"{''.join(locations)}"
        "    }\n"
        "}\n"
    )


def _stop(proc: subprocess.Popen) -> None:
    """Graceful shutdown (SIGQUIT), then SIGTERM, then SIGKILL; always reaps the master."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGQUIT, STOP_TIMEOUT), (signal.SIGTERM, 3.0)):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    proc.wait()


def _wait_ready(proc: subprocess.Popen, front: int, error_log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            log = error_log.read_text(errors="replace") if error_log.exists() else ""
            raise RuntimeError(f"nginx exited with {proc.returncode} at start-up:\n{log}")
        try:
            conn = http.client.HTTPConnection(HOST, front, timeout=1.0)
            try:
                conn.request("GET", "/ready")
                if conn.getresponse().read() == b"ready":
                    return
            finally:
                conn.close()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nginx did not answer on {HOST}:{front} in {START_TIMEOUT}s")
        time.sleep(0.02)


@contextlib.contextmanager
def _running_nginx(nginx_binary: str, weight_sets: Sequence[Mapping[str, int]]) -> Iterator[int]:
    """Start one nginx serving `weight_sets` as upstreams u0, u1, ...; yield its front port."""
    with tempfile.TemporaryDirectory(prefix="nginx-order-") as tmp:
        prefix = Path(tmp)
        if os.geteuid() == 0:
            # nginx started as root runs its worker as an unprivileged user: let it reach
            # the temp paths inside the prefix.
            prefix.chmod(0o711)
        for attempt in range(3):  # a port taken between probing and binding: try anew
            ports = _free_ports(1 + sum(len(w) for w in weight_sets))
            front, backend_ports = ports[0], iter(ports[1:])
            upstreams = [
                [(name, weight, next(backend_ports)) for name, weight in weights.items()]
                for weights in weight_sets
            ]
            conf = prefix / "nginx.conf"
            conf.write_text(_config(prefix, nginx_binary, front, upstreams))
            error_log = prefix / "error.log"
            error_log.write_text("")
            proc = subprocess.Popen(
                [nginx_binary, "-p", f"{prefix}/", "-c", str(conf), "-e", str(error_log)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                try:
                    _wait_ready(proc, front, error_log)
                except RuntimeError as exc:
                    if attempt < 2 and "Address already in use" in str(exc):
                        continue
                    raise
                yield front
                return
            finally:
                _stop(proc)


def _fetch(conn: http.client.HTTPConnection, path: str) -> str:
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read().decode()
    if resp.status != 200:
        raise RuntimeError(f"GET {path} answered {resp.status}: {body!r}")
    return body


def record_many(
    nginx_binary: str,
    weight_sets: Sequence[Mapping[str, int]],
    picks: Sequence[int] | None = None,
) -> list[list[str]]:
    """nginx's pick sequence for each weight set, all from one nginx (one upstream each).

    `picks[i]` requests are sent for `weight_sets[i]` (default: `default_picks`).
    """
    _check(weight_sets)
    counts = [default_picks(w) for w in weight_sets] if picks is None else list(picks)
    if len(counts) != len(weight_sets):
        raise ValueError("one pick count per weight set")
    if any(n < 0 or n > 10_000 for n in counts):
        raise ValueError("pick counts are bounded: 0..10000")
    sequences = []
    with _running_nginx(nginx_binary, weight_sets) as front:
        conn = http.client.HTTPConnection(HOST, front, timeout=REQUEST_TIMEOUT)
        try:
            for index, count in enumerate(counts):
                sequences.append([_fetch(conn, f"/u{index}") for _ in range(count)])
        finally:
            conn.close()
    return sequences


def record(nginx_binary: str, weights: Mapping[str, int], picks: int) -> list[str]:
    """The first `picks` peers a fresh nginx chooses from `weights` (upstream order)."""
    return record_many(nginx_binary, [weights], [picks])[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nginx", default=find_nginx(), help="nginx binary")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().with_name("nginx_order.json"),
        help="where to write the recording",
    )
    args = parser.parse_args(argv)
    if not args.nginx:
        parser.error("no nginx found: pass --nginx (apt-get install nginx-light)")
    version = nginx_version(args.nginx)
    sequences = record_many(args.nginx, CASES)
    result = [
        {"weights": dict(weights), "sequence": sequence, "nginx_version": version}
        for weights, sequence in zip(CASES, sequences, strict=True)
    ]
    # One case a line: the file stays short and diffs stay readable.
    args.output.write_text("[\n" + ",\n".join(json.dumps(case) for case in result) + "\n]\n")
    for case in result:
        print(case["weights"], " ".join(case["sequence"][:20]), file=sys.stderr)
    print(f"nginx {version}: {len(result)} cases -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
