"""The routing state: a fold of the event log.

`RoutingState.apply(event)` is the only way the state changes. It is pure and
synchronous, checks that the event fits before touching anything, and drives the
selection core so that picks always follow the state. Replaying the same events gives the
same state, which is what makes the log an audit trail.

What is state here: per node its address, static weight, health, draining, the last
reported load and whether that load put it over the watermarks; the watermarks; the last
recorded configuration. What is not: the selector's round-robin positions (each worker
process has its own) and the picks counted since the last report (in the ledger that the
workers of one dispatcher share).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import core_ext
from dispatcher.domain import events as ev
from dispatcher.domain.errors import InvalidTransition

HEALTH = ("unknown", "up", "down")

DEFAULT_HIGH_WATERMARK = 0.9
DEFAULT_LOW_WATERMARK = 0.8


@dataclass(slots=True)
class NodeRecord:
    id: str
    ip: str
    port: int
    weight: int
    health: str = "unknown"  # no client goes to a node before it is first seen up
    health_cause: str | None = None  # why it is down
    health_detail: str = ""
    health_since: float = 0.0  # time of the last health change
    seen_up: bool = False  # has been up at least once
    draining: bool = False
    overloaded: bool = False
    connections: int | None = None  # None until the first load report
    capacity: int | None = None
    updated_seq: int = 0  # the last event that changed this node


RECORD_FIELDS = NodeRecord.__slots__  # plain values all: a dict of them is a deep copy
CHANGES_KEPT = 50


class RoutingState:
    """Nodes, watermarks and the last recorded config, folded from events."""

    def __init__(self, selector_class: type | None = None) -> None:
        self.seq = 0
        self.time = 0.0
        self.nodes: dict[str, NodeRecord] = {}  # in the order they were added
        self.config: dict[str, Any] | None = None
        self.polling = True  # False while the dispatcher has no NATS: health is frozen
        self.leader: str | None = None  # cluster mode: the member that polls and records
        self.high_watermark = DEFAULT_HIGH_WATERMARK
        self.low_watermark = DEFAULT_LOW_WATERMARK
        self.high_ppm, self.low_ppm = core_ext.watermarks_ppm(
            self.high_watermark, self.low_watermark
        )
        self._selector_class = selector_class or core_ext.Selector
        self.selector = self._selector_class(self.high_watermark, self.low_watermark)
        self.changes: deque[ev.Event] = deque(maxlen=CHANGES_KEPT)
        """The latest events but load reports, newest last: what the dashboard lists. Not
        routing state: snapshots leave it out, so after a restart it starts afresh."""

    # -- the fold ---------------------------------------------------------------------

    def apply(self, event: ev.Event) -> None:
        """Apply the next event (its seq must follow the state's); unchanged if it fails."""
        if event.seq != self.seq + 1:
            raise InvalidTransition(
                f"event seq {event.seq} does not follow state seq {self.seq} ({event.type})"
            )
        handler = _HANDLERS.get(type(event))
        if handler is None:
            raise InvalidTransition(f"no handler for event type {event.type!r}")
        handler(self, event)
        self.seq = event.seq
        self.time = event.time
        if event.type != "load_reported":
            self.changes.append(event)

    def _existing(self, event: Any) -> NodeRecord:
        record = self.nodes.get(event.node)
        if record is None:
            raise InvalidTransition(f"{event.type} at seq {event.seq}: unknown node {event.node!r}")
        return record

    def _node_added(self, event: ev.NodeAdded) -> None:
        if event.node in self.nodes:
            raise InvalidTransition(f"node_added at seq {event.seq}: node {event.node!r} exists")
        self.selector.add(event.node, event.weight)  # validates the weight first
        self.selector.set_up(event.node, False)
        self.nodes[event.node] = NodeRecord(
            event.node, event.ip, event.port, event.weight,
            health_since=event.time, updated_seq=event.seq,
        )

    def _node_removed(self, event: ev.NodeRemoved) -> None:
        self._existing(event)
        self.selector.remove(event.node)
        del self.nodes[event.node]

    def _address_changed(self, event: ev.NodeAddressChanged) -> None:
        record = self._existing(event)
        record.ip, record.port, record.updated_seq = event.ip, event.port, event.seq

    def _weight_set(self, event: ev.NodeWeightSet) -> None:
        record = self._existing(event)
        self.selector.set_weight(event.node, event.weight)
        record.weight, record.updated_seq = event.weight, event.seq

    def _draining(self, event: ev.NodeDrained | ev.NodeUndrained) -> None:
        record = self._existing(event)
        draining = isinstance(event, ev.NodeDrained)
        self.selector.set_draining(event.node, draining)
        record.draining, record.updated_seq = draining, event.seq

    def _health(self, event: ev.NodeUp | ev.NodeDown) -> None:
        record = self._existing(event)
        up = isinstance(event, ev.NodeUp)
        self.selector.set_up(event.node, up)
        record.health = "up" if up else "down"
        record.seen_up = record.seen_up or up
        record.health_cause = None if up else event.cause  # type: ignore[union-attr]
        record.health_detail = "" if up else event.detail  # type: ignore[union-attr]
        record.health_since, record.updated_seq = event.time, event.seq

    def _load(self, event: ev.LoadReported) -> None:
        record = self._existing(event)
        self.selector.report(event.node, event.connections, event.capacity)
        record.connections, record.capacity = event.connections, event.capacity
        record.updated_seq = event.seq

    def _overload(self, event: ev.NodeOverloaded | ev.NodeRecovered) -> None:
        record = self._existing(event)
        record.overloaded = isinstance(event, ev.NodeOverloaded)
        record.updated_seq = event.seq

    def _polling(self, event: ev.PollingPaused | ev.PollingResumed) -> None:
        self.polling = isinstance(event, ev.PollingResumed)

    def _leader(self, event: ev.LeaderElected) -> None:
        if not isinstance(event.leader, str) or not event.leader:
            raise InvalidTransition(f"leader_elected at seq {event.seq}: no leader named")
        self.leader = event.leader

    def _config(self, event: ev.ConfigReloaded) -> None:
        balance = event.config.get("balance", {})
        high = balance.get("high_watermark", DEFAULT_HIGH_WATERMARK)
        low = balance.get("low_watermark", DEFAULT_LOW_WATERMARK)
        if (high, low) != (self.high_watermark, self.low_watermark):
            ppm = core_ext.watermarks_ppm(high, low)  # refuses bad values before any change
            state = self.selector.state()
            state["high_watermark"], state["low_watermark"] = high, low
            self._replace_selector(state, self.selector.ledger)
            self.high_watermark, self.low_watermark = high, low
            self.high_ppm, self.low_ppm = ppm
        self.config = event.config

    def use_ledger(self, ledger: Any) -> None:
        """Count picks and allowances in `ledger` from now on (the one every worker of
        this dispatcher shares: see `core_ext.ledger`); routing positions are kept."""
        self._replace_selector(self.selector.state(), ledger)

    def _replace_selector(self, state: dict[str, Any], ledger: Any) -> None:
        old = self.selector
        self.selector = self._selector_class.from_state(state, ledger)
        old.close()  # gives its ledger slots back

    # -- views ------------------------------------------------------------------------

    def node_view(self, node_id: str) -> dict[str, Any]:
        """A node as `GET /admin/nodes` and `imdispatch replay --json` show it."""
        record = self.nodes[node_id]
        view = asdict(record)
        view["effective_weight"] = self.selector.node(node_id)["effective_weight"]
        return view

    def node_views(self) -> list[dict[str, Any]]:
        return [self.node_view(node_id) for node_id in self.nodes]

    def to_dict(self) -> dict[str, Any]:
        """Everything the fold produced, as plain data (snapshots, equality in tests)."""
        return {
            "seq": self.seq,
            "time": self.time,
            "high_watermark": self.high_watermark,
            "low_watermark": self.low_watermark,
            "config": self.config,
            "polling": self.polling,
            "leader": self.leader,
            "nodes": [{name: getattr(record, name) for name in RECORD_FIELDS}
                      for record in self.nodes.values()],
        }

    def copy(self) -> RoutingState:
        """An independent state equal to this one (to try events on)."""
        return RoutingState.from_dict(self.to_dict(), self._selector_class)

    @classmethod
    def from_dict(cls, data: dict[str, Any], selector_class: type | None = None) -> RoutingState:
        """Rebuild a state saved by `to_dict`, the selector included."""
        state = cls(selector_class)
        state.seq, state.time, state.config = data["seq"], data["time"], data["config"]
        state.polling = data.get("polling", True)
        state.leader = data.get("leader")
        state.high_watermark, state.low_watermark = data["high_watermark"], data["low_watermark"]
        state.high_ppm, state.low_ppm = core_ext.watermarks_ppm(
            state.high_watermark, state.low_watermark
        )
        state.nodes = {raw["id"]: NodeRecord(**raw) for raw in data["nodes"]}
        state.selector = state._selector_class.from_state({
            "version": core_ext.SELECTOR_STATE_VERSION,
            "high_watermark": state.high_watermark,
            "low_watermark": state.low_watermark,
            "nodes": [_selector_row(record) for record in state.nodes.values()],
        })
        return state


def _selector_row(record: NodeRecord) -> dict[str, Any]:
    # Round-robin positions and pending picks are per worker: a rebuilt selector starts
    # them afresh, like a worker that just started.
    return {
        "id": record.id,
        "weight": record.weight,
        "current_weight": 0,
        "up": record.health == "up",
        "draining": record.draining,
        "overloaded": record.overloaded,
        "connections": record.connections,
        "capacity": record.capacity,
        "pending": 0,
        "ramp": 1000,  # slow start is applied by whoever serves picks, from the time
    }


_HANDLERS: dict[type, Callable[[RoutingState, Any], None]] = {
    ev.NodeAdded: RoutingState._node_added,
    ev.NodeRemoved: RoutingState._node_removed,
    ev.NodeAddressChanged: RoutingState._address_changed,
    ev.NodeWeightSet: RoutingState._weight_set,
    ev.NodeDrained: RoutingState._draining,
    ev.NodeUndrained: RoutingState._draining,
    ev.NodeUp: RoutingState._health,
    ev.NodeDown: RoutingState._health,
    ev.LoadReported: RoutingState._load,
    ev.NodeOverloaded: RoutingState._overload,
    ev.NodeRecovered: RoutingState._overload,
    ev.ConfigReloaded: RoutingState._config,
    ev.PollingPaused: RoutingState._polling,
    ev.PollingResumed: RoutingState._polling,
    ev.LeaderElected: RoutingState._leader,
}
