"""`imdispatch demo --replicas N`: the demo's processes in cluster mode. A three-server
NATS cluster instead of one nats-server, the imnodes spread over its servers, and N
`imdispatch serve` replicas (HTTP ports `--http-port`, +1, +2...) sharing one R3 JetStream
stream with a short lease, so that a failover takes seconds, not minutes. Each replica
lists every NATS server, its own first, as an operator would configure them."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from dispatcher.demo import lifetime
from dispatcher.demo.nats_cluster import NatsCluster
from dispatcher.demo.stack import DemoNode, Stack, _terminate, check_port_free

NATS_SERVERS = 3
STREAM = "IMDISPATCH"
LEASE = 2.0  # seconds: short, so the demo's leader failover is quick to watch
READY_TIMEOUT = 60.0  # N replicas starting at once on a small machine


@dataclass
class Replica:
    name: str
    port: int
    config: Path
    process: subprocess.Popen | None = field(default=None, repr=False)
    serving: bool = False  # seen ready since its last start: the demo may ask it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def rotated(urls: list[str], first: int) -> list[str]:
    """`urls` starting at `first`: each client its own first server, all of them listed."""
    first %= len(urls)
    return urls[first:] + urls[:first]


class ClusterStack(Stack):
    """The demo's processes with `replicas` dispatchers on a NATS cluster."""

    nats: NatsCluster

    def __init__(self, workdir: Path, nodes: list[DemoNode], http_port: int, token: str,
                 replicas: int) -> None:
        super().__init__(workdir, nodes, http_port, None, token)
        self.replicas = [Replica(f"r{i + 1}", http_port + i, workdir / f"replica-r{i + 1}.toml")
                         for i in range(replicas)]

    def _broker(self, nats_port: int | None) -> NatsCluster:  # type: ignore[override]
        # the cluster's name is in every member's command line: `pkill -f` finds them
        return NatsCluster(self.workdir / "nats", NATS_SERVERS, name=lifetime.MARK,
                           preexec_fn=self._preexec)

    @property
    def url(self) -> str:
        """A serving replica's URL (the first one's if none serves): where the demo
        reads the admin API, as an operator would through the balancer."""
        return next((r.url for r in self.replicas if r.running and r.serving),
                    self.replicas[0].url)

    @property
    def urls(self) -> list[str]:
        return [replica.url for replica in self.replicas]

    def _check_ports(self) -> None:
        for replica in self.replicas:
            check_port_free(replica.port, f"replica {replica.name}'s HTTP port", "--http-port")
        self._check_node_ports()

    def _wait_broker(self) -> None:
        self.nats.wait_ready()

    def nats_urls_for(self, node_id: str) -> list[str]:
        return rotated(self.nats.urls, list(self.nodes).index(node_id))

    async def _start_dispatchers(self) -> None:
        eventlog = (f'backend = "jetstream"\nstream = "{STREAM}"\n'
                    f"replicas = {NATS_SERVERS}\nlease = {LEASE}\n")
        for index, replica in enumerate(self.replicas):
            replica.config.write_text(self.config_text(
                replica.port, rotated(self.nats.urls, index), eventlog))
            self.start_replica(index)
        await asyncio.gather(*(asyncio.to_thread(self.wait_ready, r.process, r.url,
                                                 f"replica-{r.name}", READY_TIMEOUT)
                               for r in self.replicas))
        for replica in self.replicas:
            replica.serving = True

    def start_replica(self, index: int) -> None:
        """Start (or restart: same config, it rejoins) a replica, from the main thread."""
        replica = self.replicas[index]
        replica.process = self.spawn_dispatcher(f"replica-{replica.name}", replica.config)
        replica.serving = False  # until seen ready (`failover`)

    def kill_replica(self, index: int) -> None:
        """SIGKILL, as in a crash: nothing flushed, its lease left to expire."""
        replica = self.replicas[index]
        replica.serving = False
        if replica.running:
            replica.process.kill()
            replica.process.wait()

    def _stop_dispatchers(self) -> None:
        _terminate([r.process for r in self.replicas if r.process], 20)
