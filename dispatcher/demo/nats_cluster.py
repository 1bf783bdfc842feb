"""A NATS cluster on 127.0.0.1: `size` nats-server processes routed to each other, JetStream
on each (its own store, a unique server name), one cluster name. The foundation of cluster
mode's tests, benchmarks and `imdispatch demo --replicas 3`.

Each member is a `NatsServer` with cluster flags on its command line (no config file: `ps`
shows everything). Every member lists every route URL, its own included (a server ignores
the route to itself), so any member can restart alone and find the others.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import nats
from nats.errors import Error as NatsError

from dispatcher.demo.nats_server import NatsServer, free_port

PROBE_TIMEOUT = 0.5  # one connect or JetStream request of the readiness probe, seconds


class NatsCluster:
    """`size` routed nats-servers with JetStream; ready once every member reaches the
    JetStream meta leader. Ports and stores survive `kill`/`stop`: a restarted member is
    the same member to clients and to the other servers."""

    def __init__(
        self, store_root: str | os.PathLike, size: int = 3, *, name: str = "imdispatch",
        args: tuple[str, ...] = (), preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        """`name` is the cluster's name and, suffixed `-0`, `-1`..., its members' server
        names (so `args` must not set names); `args` go to every member."""
        if size < 1:
            raise ValueError(f"a cluster has at least one member, not {size}")
        root = Path(store_root)
        self.name = name
        self.route_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in self.route_ports)
        self.servers = [
            NatsServer(
                root / f"{name}-{i}",
                args=("--server_name", f"{name}-{i}", "--cluster_name", name,
                      "--cluster", f"nats://127.0.0.1:{route_port}", "--routes", routes,
                      *args),
                preexec_fn=preexec_fn,
            )
            for i, route_port in enumerate(self.route_ports)
        ]

    @property
    def urls(self) -> list[str]:
        """Every member's client URL (for nats-py's `servers=[...]`)."""
        return [server.url for server in self.servers]

    def server_name(self, index: int) -> str:
        """The member's `server_name`: what JetStream reports as a stream's leader or peer."""
        return f"{self.name}-{index}"

    def index_of(self, server_name: str) -> int:
        """The member called `server_name` (e.g. a stream's `cluster.leader`)."""
        for index in range(len(self.servers)):
            if self.server_name(index) == server_name:
                return index
        raise KeyError(f"no member {server_name!r} in cluster {self.name!r}")

    def start(self, timeout: float = 20.0) -> NatsCluster:
        """Start every member and return once each reaches the JetStream meta leader.
        On any failure every member is stopped and the error carries their logs."""
        deadline = time.monotonic() + timeout
        try:
            self.launch(timeout)
            return self.wait_ready(max(deadline - time.monotonic(), 0.1))
        except BaseException:
            self.stop()
            raise

    def launch(self, timeout: float = 10.0) -> None:
        """Start the stopped members one after another, each once the previous accepts
        clients, without the JetStream wait (in the thread that must be their parent, see
        `NatsServer.preexec_fn`); if one fails, every member is stopped.
        Staggered, every route connects at its first try; started all at once, routes
        wait a 1 s retry and the first meta election sometimes fails, and the next one
        comes only after raft's 4-9 s election timeout (5 starts in 88 here)."""
        try:
            for server in self.servers:
                if not server.running:
                    server.launch()
                    server.wait_accepting(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 20.0, members: list[int] | None = None) -> NatsCluster:
        """Return once each of `members` (default: all) answers a JetStream account-info
        request, which only the meta leader answers: the member is routed to a leader
        elected by a quorum. Raise (with the logs) if one exits first or the time runs
        out. It blocks (its probe runs an event loop in a thread of its own, so a caller's
        running loop is no obstacle): from async code, call it via `asyncio.to_thread`."""
        deadline = time.monotonic() + timeout
        chosen = [self.servers[i] for i in (range(len(self.servers)) if members is None
                                             else members)]
        with ThreadPoolExecutor(1, thread_name_prefix="nats-cluster-probe") as probe:
            probe.submit(asyncio.run, self._wait_jetstream(chosen, deadline)).result()
        return self

    async def _wait_jetstream(self, servers: list[NatsServer], deadline: float) -> None:
        waiting = list(servers)
        while waiting:
            for server in list(waiting):
                if not server.running:
                    raise RuntimeError(f"{server.url} exited while joining the cluster:\n"
                                       f"{self.log_tails()}")
                if await _answers_jetstream(server.url):
                    waiting.remove(server)
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(
                    f"no JetStream meta leader reachable from "
                    f"{', '.join(s.url for s in waiting)} in time:\n{self.log_tails()}"
                )
            if waiting:
                await asyncio.sleep(0.05)

    def kill(self, index: int) -> None:
        """Crash one member (SIGKILL): nothing flushed, its routes drop at once."""
        self.servers[index].kill()

    def restart(self, index: int, *, crash: bool = False, timeout: float = 20.0) -> NatsCluster:
        """Stop (or kill) one member if it runs, start it on the same ports with the same
        store, and return once it reaches the meta leader again."""
        server = self.servers[index]
        if crash:
            server.kill()
        else:
            server.stop()
        deadline = time.monotonic() + timeout
        try:
            server.launch()
            server.wait_accepting(timeout)
            return self.wait_ready(max(deadline - time.monotonic(), 0.1), members=[index])
        except BaseException:
            server.stop()
            raise

    def stop(self) -> None:
        """Stop every member (SIGTERM, SIGKILL if stuck); safe to call twice."""
        for server in self.servers:
            server.stop()

    def log_tails(self, lines: int = 15) -> str:
        """The end of every member's log, for an error that must say why."""
        return "\n".join(f"--- {self.server_name(i)} ({server.log_path})\n"
                         f"{server.log_tail(lines)}"
                         for i, server in enumerate(self.servers))

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def _answers_jetstream(url: str) -> bool:
    """Whether the server at `url` relays a JetStream account-info request to a meta leader
    and gets the answer (a leaderless cluster answers 503 or not at all)."""

    async def quiet(_exc: Exception) -> None:  # the probe's failures are expected
        pass

    try:
        nc = await nats.connect(url, connect_timeout=PROBE_TIMEOUT, allow_reconnect=False,
                                max_reconnect_attempts=0, error_cb=quiet)
    except (OSError, NatsError):  # OSError covers TimeoutError
        return False
    try:
        await nc.jetstream(timeout=PROBE_TIMEOUT).account_info()
        return True
    except (TimeoutError, NatsError):
        return False
    finally:
        await nc.close()
