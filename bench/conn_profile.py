"""Where a new connection's time goes: one server (1 worker) under py-spy while wrk sends
it one request per connection (`Connection: close`), for the lead's optimisation.

    python -m bench.conn_profile plain|fast|bare|nginx [--seconds 10] [--out DIR]
        [--native | --perf]

Writes DIR/<server>[-native].raw (py-spy's collapsed stacks) and prints the costs per
connection: the time under each step of a connection's life (`STEPS`), the top functions
by self and by inclusive time. Use `--native`: without it py-spy sees no C frames and,
under uvloop, puts about half of the samples (Python callbacks included, perf shows) on
the frame that runs the loop, `_run_server_forever`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench import servers, wrk
from bench.processes import stop
from tests.nats_server import NatsServer

PY_SPY = "/tmp/pyspy/bin/py-spy"
RATE = 200  # samples per second
PERF_RATE = 999
SYSCALLS = {  # system call -> the kernel function that runs it whole (as perf names it)
    "all system calls": "do_syscall_64", "write": "ksys_write", "read": "ksys_read",
    "close": "__x64_sys_close", "accept4": "__sys_accept4",
    "epoll_ctl": "__x64_sys_epoll_ctl", "epoll_wait": "do_epoll_wait",
    "io_uring_enter": "__do_sys_io_uring_enter", "setsockopt": "__sys_setsockopt",
    "getsockname": "__sys_getsockname", "getpeername": "__sys_getpeername",
    "shutdown": "__sys_shutdown", "writev": "do_writev", "recvfrom": "__sys_recvfrom",
    "sendto": "__sys_sendto",
}

# A connection's steps: (step, pattern on a frame's function name). Each sample goes to
# the first step with a frame in its stack (so the shares add up to 100%); the C ones are
# only seen with --native.
STEPS = [
    ("response write (transport.write, syscall)", r"^send$|^UVStream_write$"),
    ("close, connection_lost", r"(\.|^|_)(close|connection_lost|abort|uv__stream_close)$"),
    ("Request object", r"Request\.__init__$"),
    ("request header parsing (rest)", r"http1_request_header$"),
    ("handler + response object", r"handle_request$"),
    ("ConnInfo", r"ConnInfo\."),
    ("protocol __init__", r"(Protocol|Side)\.__init__$"),
    ("timers (check_timeouts, call_later)", r"(check_timeouts|_check_write|call_later)$"),
    ("connection_made: rest (task creation, ...)", r"\.connection_made$"),
    ("accept", r"(UVStream__accept|uv__accept|accept4)$"),
    ("transport creation (uvloop)", r"(TCPServer__make_new_transport|on_listen)$"),
    ("read, data_received", r"(data_received|uv__read)$"),
    ("connection task: rest (Http.http1, ...)", r"connection_task$"),
    ("epoll", r"(epoll_pwait|epoll_ctl|uv__io_poll|io_uring_enter)$"),
]


def profile(server: str, seconds: int, out: Path, native: bool = False,
            perf: bool = False) -> str:
    with tempfile.TemporaryDirectory() as directory, NatsServer(Path(directory) / "js") as nats:
        processes = []
        try:
            pid = None
            if server == "bare":
                port, process = servers.start_bare_sanic(1)
            elif server == "nginx":  # perf only: its one worker is the master's child
                port, process = servers.start_nginx(Path(directory), 1)
                pid = int(Path(f"/proc/{process.pid}/task/{process.pid}/children")
                          .read_text().split()[0])
            else:
                nodes, processes = servers.start_nodes(nats.url)
                port, process = servers.start_get_tcp_ip(Path(directory), nats.url, nodes,
                                                         workers=1,
                                                         fast_path=server == "fast")
            processes.append(process)
            pid = pid or process.pid
            url = f"http://127.0.0.1:{port}{servers.REQUEST}"
            wrk.run(url, 1, threads=1, close=True)  # warm up
            raw = out / f"{server}{'-native' if native else ''}.{'perf' if perf else 'raw'}"
            if perf:
                command = ["perf", "record", "-F", str(PERF_RATE), "-g", "-p", str(pid),
                           "-o", str(raw), "--", "sleep", str(seconds)]
            else:
                command = [PY_SPY, "record", "--format", "raw", "--rate", str(RATE),
                           *(["--native"] if native else []), "--pid", str(pid),
                           "--duration", str(seconds), "--output", str(raw)]
            profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            run = wrk.run(url, seconds, threads=1, close=True)
            profiler.wait(timeout=seconds + 30)
        finally:
            stop(*processes)
    if perf:
        return perf_summary(server, raw, run, seconds)
    return summary(server, raw.read_text(), run, seconds)


def perf_summary(server: str, data: Path, run: wrk.WrkRun, seconds: int) -> str:
    """On-CPU time per connection by library and by system call (perf sees no Python
    function names on 3.11: the interpreter is one block)."""
    def report(*options: str) -> list[tuple[float, str]]:
        text = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "-g", "none",
                               "-n", *options], capture_output=True, text=True,
                              check=True).stdout
        return [(float(share), name.strip()) for share, name in re.findall(
            r"^\s+([\d.]+)%\s+(?:[\d.]+%\s+)?\d+\s+(.+)$", text, re.MULTILINE)]

    libraries = report("--no-children", "--sort", "dso")
    text = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "-g", "none", "-n",
                           "--no-children", "--sort", "dso"], capture_output=True,
                          text=True, check=True).stdout
    samples = sum(int(n) for n in re.findall(r"^\s+[\d.]+%\s+(\d+)\s", text, re.MULTILINE))
    busy = samples / PERF_RATE / (run.rate * seconds) * 1e6  # on-CPU us per connection
    lines = [f"## {server} (perf, on-CPU): {run.rate:,.0f} connections/s, {busy:.1f} us "
             "on CPU per connection", "", "| library | per connection | share |",
             "|---|---|---|"]
    lines += [f"| {name} | {share * busy / 100:.1f} us | {share:.1f}% |"
              for share, name in libraries[:8]]
    children = {name.split("] ")[-1]: share
                for share, name in report("--children", "--sort", "sym")}
    calls = sorted(((children[symbol], call) for call, symbol in SYSCALLS.items()
                    if symbol in children), reverse=True)
    lines += ["", "| system call (with what it calls) | per connection | share |",
              "|---|---|---|"]
    lines += [f"| {name} | {share * busy / 100:.1f} us | {share:.1f}% |"
              for share, name in calls]
    return "\n".join(lines) + "\n"


def summary(server: str, text: str, run: wrk.WrkRun, seconds: int) -> str:
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    samples = sum(count for _, count in stacks)
    connections = run.rate * seconds
    per_connection_us = 1e6 / RATE / connections  # one sample, spread over the connections

    def us(count: int) -> str:
        return f"{count * per_connection_us:6.1f} us"

    own, inclusive, steps = Counter(), Counter(), Counter()
    for frames, count in stacks:
        frames = [_function(frame) for frame in frames]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        names = [frame.partition(" (")[0] for frame in frames]
        steps[next((step for step, pattern in STEPS
                    if any(re.search(pattern, name) for name in names)), "other")] += count
    lines = [f"## {server}: {run.rate:,.0f} connections/s (wrk -t1 -c64, Connection: close), "
             f"{samples} samples busy of {RATE * seconds:.0f}, "
             f"{samples * per_connection_us:.1f} us busy per connection", "",
             "| step | per connection | share |", "|---|---|---|"]
    lines += [f"| {step} | {us(steps[step])} | {steps[step] / samples:.0%} |"
              for step in [step for step, _ in STEPS] + ["other"]]
    lines += ["", "| top self | per connection | share |", "|---|---|---|"]
    lines += [f"| `{frame}` | {us(count)} | {count / samples:.0%} |"
              for frame, count in own.most_common(15)]
    lines += ["", "| top inclusive | per connection | share |", "|---|---|---|"]
    lines += [f"| `{frame}` | {us(count)} | {count / samples:.0%} |"
              for frame, count in inclusive.most_common(25)]
    return "\n".join(lines) + "\n"


def _function(frame: str) -> str:
    """'f (/venv/.../site-packages/sanic/x.py:12)' -> 'f (sanic/x.py)': one row a function."""
    name, _, where = frame.removesuffix(")").partition(" (")
    where = re.sub(r"^.*/(site-packages|main|python3\.\d+)/", "", where.rsplit(":", 1)[0])
    return f"{name} ({where})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conn_profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("server", choices=["plain", "fast", "bare", "nginx"],
                        help="nginx: with --perf only")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--native", action="store_true",
                        help="sample C frames too (uvloop, the kernel calls)")
    parser.add_argument("--perf", action="store_true",
                        help="perf record instead of py-spy: on-CPU time by library and "
                             "by system call")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(profile(args.server, args.seconds, args.out, args.native, args.perf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
