"""The node's own figures in the Prometheus text format, on an optional HTTP port
(`imnode serve --metrics-listen HOST:PORT`): the same numbers its status reply carries,
in base units (`promtool check metrics` refuses abbreviated ones such as `_ms`, `_s`; the
status reply's `loop_lag_ms` and `uptime_s` are another contract and keep theirs).

Served by prometheus_client's own small HTTP server, in its thread; a scrape reads the
node's counters, which only the event loop writes (a figure can be one update behind).
"""

from __future__ import annotations

from collections.abc import Iterator
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


def serve(node: Any, host: str, port: int) -> Any:
    """Start the metrics HTTP server; returns it (call `.shutdown()` to stop)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
