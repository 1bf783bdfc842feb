"""The demo's processes: a nats-server, the imnodes and the dispatcher, each a child
process listening on 127.0.0.1 only, with its output in a log file in the work directory.

Children run in their own process group, so a Ctrl-C reaches the demo alone and it stops
them in order (dispatcher, nodes, broker) instead of all of them dying at once; and they
die with the demo if it is killed (see `lifetime`).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from dispatcher.demo import lifetime
from dispatcher.demo.nats_server import NatsServer, NatsServerMissing, free_port

WEIGHTS = (3, 2, 1)
CAPACITY_MARGIN = 2.0  # each node can hold this many times its share of the clients


class DemoError(RuntimeError):
    """Something the user can fix (a port taken, nats-server missing): said plainly."""


class Interrupted(Exception):
    """Asked to stop (Ctrl-C) while starting up."""


@dataclass
class DemoNode:
    id: str
    port: int
    weight: int
    capacity: int
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def plan_nodes(count: int, clients: int, base_port: int | None) -> list[DemoNode]:
    """Weights 3, 2, 1 (repeating); capacities a margin above each node's share of the
    clients, so that losing a node strains the others without filling them for long."""
    weights = [WEIGHTS[i % len(WEIGHTS)] for i in range(count)]
    total = sum(weights)
    return [DemoNode(f"n{i + 1}", base_port + i if base_port else free_port(), weight,
                     max(20, math.ceil(clients * weight / total * CAPACITY_MARGIN)))
            for i, weight in enumerate(weights)]


def check_port_free(port: int, what: str, option: str) -> None:
    """Refuse a port another socket holds, as the server about to bind it would. Not one
    in TIME_WAIT (left by the last run): the servers set SO_REUSEADDR, so must the probe."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise DemoError(f"port {port} on 127.0.0.1 is taken ({what}): choose another "
                            f"with {option}") from None


class Stack:
    """Start, break and stop the demo cluster."""

    def __init__(self, workdir: Path, nodes: list[DemoNode], http_port: int,
                 nats_port: int | None, token: str) -> None:
        self.workdir = workdir
        self.nodes = {node.id: node for node in nodes}
        self.http_port = http_port
        self.token = token
        self._preexec = lifetime.die_with_parent()
        self.nats = self._broker(nats_port)
        self.dispatcher: subprocess.Popen | None = None
        self.stopping = threading.Event()  # set from the demo's loop: start() gives up
        self._logs: list[IO[bytes]] = []

    def _broker(self, nats_port: int | None) -> NatsServer:
        return NatsServer(self.workdir / "nats", port=nats_port, args=("-n", lifetime.MARK),
                          preexec_fn=self._preexec)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def events_path(self) -> Path:
        return self.workdir / "events"

    async def start(self) -> None:
        """Spawn here, in the main thread (the children's parent thread: they die with
        it); wait in threads, so that the loop hears a Ctrl-C meanwhile."""
        self._check_ports()
        try:
            self.nats.launch()
            await asyncio.to_thread(self._wait_broker)
        except NatsServerMissing:
            raise
        except RuntimeError as exc:  # it exited or did not answer: its log says why
            raise DemoError(str(exc)) from None
        for node_id in self.nodes:
            if self.stopping.is_set():
                raise Interrupted
            self.start_node(node_id)
        await self._start_dispatchers()

    def _check_ports(self) -> None:
        check_port_free(self.http_port, "the dispatcher's HTTP port", "--http-port")
        check_port_free(self.nats.port, "the NATS port", "--nats-port")
        self._check_node_ports()

    def _check_node_ports(self) -> None:
        for node in self.nodes.values():
            check_port_free(node.port, f"imnode {node.id}", "--node-base-port")

    def _wait_broker(self) -> None:
        self.nats.wait_accepting()

    async def _start_dispatchers(self) -> None:
        config = self.workdir / "dispatcher.toml"
        config.write_text(self.config_text(self.http_port, [self.nats.url],
                                           f'path = "{self.events_path}"\n'))
        self.dispatcher = self.spawn_dispatcher("dispatcher", config)
        await asyncio.to_thread(self.wait_ready, self.dispatcher, self.url, "dispatcher")

    def nats_urls_for(self, node_id: str) -> list[str]:
        """The NATS servers imnode `node_id` is told of."""
        return [self.nats.url]

    def start_node(self, node_id: str) -> None:
        """Start (or restart) a node: from the main thread, see `start`."""
        node = self.nodes[node_id]
        node.process = self._spawn(f"imnode-{node.id}", lifetime.python_argv(
            "-m", "imnode", "serve", "--id", node.id,
            "--listen", f"127.0.0.1:{node.port}", "--nats", ",".join(self.nats_urls_for(node_id)),
            "--capacity", str(node.capacity)))

    def kill_node(self, node_id: str) -> None:
        """SIGKILL: the node's process is gone at once, as in a crash."""
        node = self.nodes[node_id]
        if node.running:
            node.process.kill()
            node.process.wait()

    def stop(self) -> None:
        """Dispatcher first (it flushes its log), then the nodes, then the broker."""
        self._stop_dispatchers()
        _terminate([n.process for n in self.nodes.values() if n.process], 10)
        self.nats.stop()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def _stop_dispatchers(self) -> None:
        _terminate([self.dispatcher] if self.dispatcher else [], 20)

    def spawn_dispatcher(self, name: str, config: Path) -> subprocess.Popen:
        """`imdispatch serve --config <config>` with the demo's admin token; its output
        goes to `<name>.log`. From the main thread, see `start`."""
        return self._spawn(name, lifetime.python_argv("-m", "dispatcher", "serve", "--config",
                                                      str(config)),
                           {"IMDISPATCH_ADMIN_TOKEN": f"demo:{self.token}"})

    def _spawn(self, name: str, argv: list[str],
               env: dict[str, str] | None = None) -> subprocess.Popen:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the demo's children are spawned from its main thread only")
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 -- closed in stop()
        self._logs.append(log)
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, process_group=0,
                                env={**os.environ, **(env or {})}, preexec_fn=self._preexec)

    def config_text(self, port: int, nats_urls: list[str], eventlog: str) -> str:
        """A dispatcher's config: its port, its NATS servers, the lines of its
        `[eventlog]`; the same nodes, polling and balancing for every dispatcher."""
        nodes = "".join(f'[[nodes]]\nid = "{n.id}"\nip = "127.0.0.1"\nport = {n.port}\n'
                        f"weight = {n.weight}\n" for n in self.nodes.values())
        servers = ", ".join(f'"{url}"' for url in nats_urls)
        return (f'[http]\nhost = "127.0.0.1"\nport = {port}\nretry_after = 2\n'
                f"[nats]\nservers = [{servers}]\n"
                "[poll]\ninterval = 0.5\ntimeout = 0.25\nrise = 2\nfall = 2\nstale_after = 5\n"
                "[balance]\nslow_start = 20\n"
                f"[eventlog]\n{eventlog}" + nodes)

    def wait_ready(self, process: subprocess.Popen, url: str, name: str,
                   timeout: float = 30.0) -> None:
        """Return once `url`/readyz answers 200; a DemoError with the end of `<name>.log`
        if the process exits first or the time runs out (blocks: run it in a thread)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stopping.is_set():
                raise Interrupted
            if process.poll() is not None:
                raise DemoError(f"the {name} stopped at start-up:\n"
                                + _tail(self.workdir / f"{name}.log"))
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise DemoError(f"the {name} was not ready after {timeout:.0f} s:\n"
                        + _tail(self.workdir / f"{name}.log"))


def _terminate(processes: list[subprocess.Popen], timeout: float) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
