"""`GET /metrics`: the Prometheus text format, written by prometheus_client.

Counters and histograms come from every worker's `WorkerStats` (summed through the stats
files, see `dispatcher.stats`); gauges about the nodes and the dispatcher come from the
routing state of the worker that answers, which every worker has (a follower's lags the
log by at most its tail interval).
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
VERSION = version("imdispatch")
HEALTH_STATES = ("up", "down", "unknown")


class DispatcherCollector:
    """A prometheus_client collector over one worker's snapshot and everyone's figures."""

    def __init__(self, snapshot: dict[str, Any], figures: dict[str, Any]) -> None:
        self.snapshot, self.figures = snapshot, figures

    def collect(self) -> Iterator[Metric]:
        yield from _counters(self.figures)
        yield from _histograms(self.figures)
        yield from self._state()

    def _state(self) -> Iterator[Metric]:
        snapshot, details = self.snapshot, self.snapshot["details"]
        info = InfoMetricFamily("imdispatch", "The dispatcher's version and this worker's role")
        info.add_metric([], {"version": VERSION, "role": snapshot["role"]})
        yield info
        for name, value, text in (
            ("ready", snapshot["ready"], "1 when /readyz answers 200"),
            ("nats_connected", details["nats_connected"], "1 while the leader has NATS"),
            ("panic", details["panic"], "1 in panic mode (too few nodes up)"),
            ("state_seq", details["state_seq"], "Seq of the last event in the routing state"),
            ("workers", self.figures["workers"],
             "Worker processes that wrote figures in this run (dead ones included)"),
        ):
            yield GaugeMetricFamily(f"imdispatch_{name}", text, value=float(value))
        age = details["last_poll_age_s"]
        yield GaugeMetricFamily(
            "imdispatch_state_age_seconds",
            "Seconds since the last full poll cycle (NaN before the first)",
            value=float("nan") if age is None else age)
        nodes = snapshot["nodes"]
        per_node = {
            "weight": ("Static weight", lambda n: n["weight"]),
            "effective_weight": ("Weight after headroom and slow start",
                                 lambda n: n["effective_weight"]),
            "connections": ("Connections the node last reported",
                            lambda n: n["connections"]),
            "capacity": ("Capacity the node last reported", lambda n: n["capacity"]),
            "overloaded": ("1 while past its high watermark", lambda n: n["overloaded"]),
            "draining": ("1 while drained", lambda n: n["draining"]),
        }
        for name, (text, value) in per_node.items():
            family = GaugeMetricFamily(f"imdispatch_node_{name}", text, labels=["node"])
            for node in nodes:
                figure = value(node)
                if figure is not None:
                    family.add_metric([node["id"]], float(figure))
            yield family
        health = GaugeMetricFamily("imdispatch_node_health",
                                   "1 for the node's health state, 0 for the others",
                                   labels=["node", "state"])
        for node in nodes:
            for state in HEALTH_STATES:
                health.add_metric([node["id"], state], float(node["health"] == state))
        yield health


def _counters(figures: dict[str, Any]) -> Iterator[Metric]:
    requests = CounterMetricFamily("imdispatch_http_requests",
                                   "HTTP requests answered, by route and status",
                                   labels=["route", "status"])
    for (route, status), count in sorted(figures["requests"].items()):
        requests.add_metric([route, str(status)], count)
    yield requests
    assignments = CounterMetricFamily(
        "imdispatch_assignments",
        "Clients handed to each node (primary only), by how the pick came: "
        "get-tcp-ip (http) or imdispatch.pick (nats)", labels=["node", "via"])
    by_nats = figures["nats_assignments"]
    for node, count in sorted(figures["assignments"].items()):
        assignments.add_metric([node, "http"], count - by_nats.get(node, 0))
        assignments.add_metric([node, "nats"], by_nats.get(node, 0))
    yield assignments
    refusals = CounterMetricFamily(
        "imdispatch_pick_refusals",
        "Picks that found no node, by reason: no_node (none can take a client), excluded "
        "(the request excluded every node that could)", labels=["via", "reason"])
    for (via, reason), count in sorted(figures["refusals"].items()):
        refusals.add_metric([via, reason], count)
    yield refusals
    failures = CounterMetricFamily("imdispatch_poll_failures",
                                   "Status requests that failed, by cause", labels=["cause"])
    for cause, count in sorted(figures["poll_failures"].items()):
        failures.add_metric([cause], count)
    yield failures
    yield CounterMetricFamily("imdispatch_eventlog_appends",
                              "Events appended to the event log", value=figures["appends"])


def _histograms(figures: dict[str, Any]) -> Iterator[Metric]:
    for key, name, text in (
        ("latency", "imdispatch_get_tcp_ip_seconds", "Time in the get-tcp-ip handler"),
        ("poll_cycle", "imdispatch_poll_cycle_seconds", "Duration of a full poll cycle"),
        ("fsync", "imdispatch_eventlog_fsync_seconds", "Duration of one event log fsync"),
    ):
        histogram = figures[key]
        buckets, running = [], 0
        for bound, count in zip([*histogram["bounds"], float("inf")], histogram["counts"],
                                strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        yield HistogramMetricFamily(name, text, buckets=buckets, sum_value=histogram["sum"])


def exposition(snapshot: dict[str, Any], figures: dict[str, Any]) -> bytes:
    """The text format for a worker's `Serving.snapshot()` and everyone's figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DispatcherCollector(snapshot, figures))
    return generate_latest(registry)
