"""The node's own figures in the Prometheus text format, on an optional HTTP port
(`imnode serve --metrics-listen HOST:PORT`): the same numbers its status reply carries,
in base units (`promtool check metrics` refuses abbreviated ones such as `_ms`, `_s`; the
status reply's `loop_lag_ms` and `uptime_s` are another contract and keep theirs).

Served by prometheus_client's own small HTTP server, in its thread; a scrape reads the
node's counters, which only the event loop writes (a figure can be one update behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# metric name (after `imnode_`) -> (status key, factor to the metric's unit, help)
GAUGES = {
    "connections": ("connections", 1, "Client connections now"),
    "capacity": ("capacity", 1, "Most client connections"),
    "accepting": ("accepting", 1, "1 while it takes new clients"),
    "draining": ("draining", 1, "1 while draining"),
    "cpu": ("cpu", 1, "CPU share of this process over the last second (1 = one core)"),
    "loop_lag_seconds": ("loop_lag_ms", 0.001,
                         "Worst event loop lag over the last second, in seconds"),
    "sessions": ("sessions", 1, "Logged-in uids"),
    "inflight": ("inflight", 1, "Cross-node messages on their way"),
    "uptime_seconds": ("uptime_s", 1, "Seconds since start"),
}
COUNTERS = {
    "messages_in": "Messages clients sent",
    "messages_delivered": "Messages written to their recipient's connection",
    "messages_offline": "Messages refused: the recipient is not connected anywhere",
    "messages_refused": "Messages refused for another reason (busy, timeout, ...)",
    "heartbeats": "Pings received",
    "heartbeats_timed_out": "Clients closed for missing their heartbeats",
    "hello_timeouts": "Connections closed for not saying hello in time",
    "refused_busy": "Connections refused at capacity",
    "replaced": "Sessions replaced by a newer login of the same uid",
    "slow_consumers": "Clients closed for not reading",
    "protocol_errors": "Connections closed for breaking the protocol",
}


class NodeCollector:
    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        status = self.node.status()
        labels = {"node": status["node_id"]}
        for name, (key, factor, text) in GAUGES.items():
            family = GaugeMetricFamily(f"imnode_{name}", text, labels=list(labels))
            family.add_metric(list(labels.values()), float(status[key]) * factor)
            yield family
        for name, text in COUNTERS.items():
            if name in status:
                family = CounterMetricFamily(f"imnode_{name}", text, labels=list(labels))
                family.add_metric(list(labels.values()), float(status[name]))
                yield family


STOP_WITHIN = 2.0  # seconds `stop` waits for the server's thread


def serve(node: Any, host: str, port: int) -> Any:
    """Start the metrics HTTP server; returns it (stop it with `stop`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def stop(server: Any) -> Awaitable[None]:
    """Start stopping `server` now, in a daemon thread: its `shutdown()` blocks until the
    server's loop notices (within its 0.5 s poll), which must not stall the event loop,
    and then its socket is closed. Await the result to wait for that, `STOP_WITHIN`
    seconds at most. A scrape in flight goes on in its own daemon thread."""
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()

    def done() -> None:
        if not stopped.done():
            stopped.set_result(None)

    def shut() -> None:
        try:
            server.shutdown()
            server.server_close()
        finally:
            with contextlib.suppress(RuntimeError):  # the event loop is closed already
                loop.call_soon_threadsafe(done)

    threading.Thread(target=shut, name="metrics-stop", daemon=True).start()
    return _waited(stopped)


async def _waited(stopped: asyncio.Future) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopped, STOP_WITHIN)
