"""Running an imnode process: the node, its link to NATS, and its signals.

The node serves clients from the first moment, with or without NATS: the NATS link
connects in the background (retrying until it succeeds), then registers the node as
instance of the `imnode` micro service (endpoints `status` and `drain`) and carries
cross-node messages. nats-py reconnects and resubscribes by itself after that, so a NATS
outage never touches client connections, and the status responder comes back with NATS.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from collections.abc import Sequence
from typing import Any

import nats
import orjson

from imnode import metrics
from imnode.contract import host_port
from imnode.micro import Service, close_link
from imnode.server import Node, NodeConfig
from imnode.tasks import cancel_and_wait

log = logging.getLogger("imnode")

SERVICE_NAME = "imnode"
DESCRIPTION = "IM long-connection node: clients hold TCP connections, status over NATS"


class NatsLink:
    """The node's NATS connection and micro service, established in the background."""

    def __init__(self, node: Node, servers: Sequence[str], options: dict[str, Any] | None = None,
                 retry_every: float = 1.0) -> None:
        self.node = node
        self.servers = list(servers)
        self.options = options or {}
        self.retry_every = retry_every
        self.nc: Any = None
        self.service: Service | None = None
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        self.duplicate = False
        self._draining: asyncio.Task | None = None
        self._closing = False  # close() is ours: the disconnect it makes is no news

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        config = self.node.config
        while True:
            try:
                nc = await nats.connect(
                    servers=self.servers, name=f"imnode {config.node_id}",
                    max_reconnect_attempts=-1, reconnect_time_wait=self.retry_every,
                    connect_timeout=2, allow_reconnect=True,
                    disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
                    error_cb=self._error,
                    # replies to this node's own requests arrive under its own prefix, so
                    # NATS permissions can keep each node out of the others' replies
                    inbox_prefix=f"_INBOX.imnode.{config.node_id}", **self.options,
                )
                break
            except Exception as exc:  # no server yet: the node serves clients meanwhile
                log.warning("NATS %s unreachable (%s); retrying in %.1f s",
                            ",".join(_without_credentials(url) for url in self.servers),
                            exc, self.retry_every)
                await asyncio.sleep(self.retry_every)
        self.nc = nc
        if await self._id_taken(nc):
            log.error("another node already answers imnode.%s.status: not registering this "
                      "one (two nodes with one id would share status and deliveries)",
                      config.node_id)
            self.duplicate = True
            return
        service = Service(nc, SERVICE_NAME, config.version, DESCRIPTION,
                          metadata={"node_id": config.node_id})
        await service.add_endpoint("status", f"imnode.{config.node_id}.status", self._status)
        await service.add_endpoint("drain", f"imnode.{config.node_id}.drain", self._drain)
        await self.node.attach(nc)
        await service.start()
        self.service = service
        self.connected.set()
        log.info("NATS connected; micro service %s instance %s", SERVICE_NAME, service.id)

    async def _id_taken(self, nc: Any) -> bool:
        try:
            await nc.request(f"imnode.{self.node.config.node_id}.status", b"", timeout=1)
        except Exception:  # no responders (the normal case) or no answer in time
            return False
        return True

    async def _status(self, request: Any) -> bytes:
        return orjson.dumps(self.node.status())

    async def _drain(self, request: Any) -> bytes:
        self._draining = asyncio.get_running_loop().create_task(self.node.drain())
        return orjson.dumps({"node_id": self.node.config.node_id, "draining": True})

    async def _error(self, exc: Exception) -> None:
        if not self._closing:  # one line, not nats-py's traceback
            log.warning("NATS: %s", exc or type(exc).__name__)

    async def _disconnected(self) -> None:
        if not self._closing:
            log.warning("NATS disconnected; clients stay connected, status resumes on "
                        "reconnect")

    async def _reconnected(self) -> None:
        log.info("NATS reconnected; resubscribing and announcing sessions")
        await self.node.resync()

    async def close(self) -> None:
        self._closing = True
        await cancel_and_wait(self._task)
        if self.nc is not None:
            await close_link(self.nc, self.service)


def _without_credentials(url: str) -> str:
    """nats://user:password@host -> nats://host: URLs may carry secrets; logs must not."""
    return re.sub(r"//[^/@]*@", "//", url)


async def run(config: NodeConfig, servers: Sequence[str],
              nats_options: dict[str, Any] | None = None,
              metrics_listen: tuple[str, int] | None = None) -> None:
    """Serve until SIGTERM or SIGINT (or a drain request), drain, and return."""
    node = Node(config)
    await node.start()
    link = NatsLink(node, servers, nats_options)
    link.start()
    try:
        exporter = metrics.serve(node, *metrics_listen) if metrics_listen else None
    except OSError:  # the metrics port is taken: stop what started, then say so
        await node.stop()
        await link.close()
        raise
    loop = asyncio.get_running_loop()
    signals = []

    def on_signal() -> None:  # the first signal drains; a second one stops at once
        signals.append(loop.create_task(node.stop() if signals else node.drain()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    host, port = node.address
    listening = host_port(config.host, config.port)
    log.info("imnode %s listening on %s (capacity %d)", config.node_id, listening,
             config.capacity)
    print(f"imnode {config.node_id} listening on {listening}, "
          f"advertised as {host_port(host, port)}", flush=True)
    try:
        await node.drained()
        log.info("imnode %s drained", config.node_id)
    finally:
        # the metrics server stops in its thread meanwhile (it notices within 0.5 s)
        metrics_stopped = metrics.stop(exporter) if exporter is not None else None
        try:
            await node.stop()  # first: its unsubscribes still find NATS
            await link.close()
        finally:
            if metrics_stopped is not None:
                await metrics_stopped
