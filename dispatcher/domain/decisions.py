"""Decisions: what an observation or a command means for the routing state, as events.

Each function takes the current state and an input and returns the events to record
(possibly none), without changing anything; the journal stamps, stores and applies them.
Inputs are validated here, at the edge, so every event that reaches the log is valid for
the state it follows.
"""

from __future__ import annotations

from typing import Any

import core_ext
from dispatcher.domain import events as ev
from dispatcher.domain.errors import DomainError
from dispatcher.domain.state import RoutingState
from imnode.contract import NODE_ID, node_address

DEFAULT_LOAD_STEP = 0.01
"""A load report is recorded when connections moved by at least this share of capacity."""


class InvalidCommand(DomainError, ValueError):
    """A command with a bad value or one that does not fit the state (unknown node, ...)."""


class UnknownNode(InvalidCommand):
    """A command about a node the state does not have (never added, or removed)."""


class NodeExists(InvalidCommand):
    """Adding a node whose id the state already has."""


class TooManyNodes(InvalidCommand):
    """Adding a node past `core_ext.MAX_NODES`."""


def _check_node_id(node: Any) -> str:
    if not isinstance(node, str) or not NODE_ID.match(node):
        raise InvalidCommand(
            f"node id must be 1-64 letters, digits, '-' or '_', got {node!r}"
        )
    return node


def _check_address(node: str, ip: Any, port: Any) -> tuple[str, int]:
    try:
        address = node_address(ip)
    except ValueError as exc:
        raise InvalidCommand(f"node {node!r}: ip {exc}") from None
    if type(port) is not int or not 1 <= port <= 65535:
        raise InvalidCommand(f"node {node!r}: port must be an int in 1..65535, got {port!r}")
    return address, port


def _check_weight(node: str, weight: Any) -> int:
    if type(weight) is not int or not 0 <= weight <= core_ext.MAX_WEIGHT:
        raise InvalidCommand(
            f"node {node!r}: weight must be an int in 0..{core_ext.MAX_WEIGHT}, got {weight!r}"
        )
    return weight


def _known(state: RoutingState, node: Any) -> str:
    if node not in state.nodes:
        raise UnknownNode(f"unknown node {node!r}")
    return node


def add_node(
    state: RoutingState, node: Any, ip: Any, port: Any, weight: Any = 1, *,
    actor: str, reason: str | None = None,
) -> list[ev.Event]:
    node = _check_node_id(node)
    if node in state.nodes:
        raise NodeExists(f"node {node!r} already exists")
    if len(state.nodes) >= core_ext.MAX_NODES:
        raise TooManyNodes(f"cannot add node {node!r}: a dispatcher routes at most "
                           f"{core_ext.MAX_NODES} nodes")
    ip, port = _check_address(node, ip, port)
    weight = _check_weight(node, weight)
    return [ev.NodeAdded(node=node, ip=ip, port=port, weight=weight, actor=actor, reason=reason)]


def remove_node(
    state: RoutingState, node: Any, *, actor: str, reason: str | None = None
) -> list[ev.Event]:
    return [ev.NodeRemoved(node=_known(state, node), actor=actor, reason=reason)]


def change_address(
    state: RoutingState, node: Any, ip: Any, port: Any, *, actor: str, reason: str | None = None
) -> list[ev.Event]:
    record = state.nodes[_known(state, node)]
    ip, port = _check_address(node, ip, port)
    if (ip, port) == (record.ip, record.port):
        return []
    return [ev.NodeAddressChanged(node=node, ip=ip, port=port, actor=actor, reason=reason)]


def set_weight(
    state: RoutingState, node: Any, weight: Any, *, actor: str, reason: str | None = None
) -> list[ev.Event]:
    record = state.nodes[_known(state, node)]
    weight = _check_weight(node, weight)
    if weight == record.weight:
        return []
    return [ev.NodeWeightSet(node=node, weight=weight, actor=actor, reason=reason)]


def set_draining(
    state: RoutingState, node: Any, draining: Any, *, actor: str, reason: str | None = None
) -> list[ev.Event]:
    record = state.nodes[_known(state, node)]
    if type(draining) is not bool:
        raise InvalidCommand(f"node {node!r}: draining must be true or false, got {draining!r}")
    if draining == record.draining:
        return []
    kind = ev.NodeDrained if draining else ev.NodeUndrained
    return [kind(node=node, actor=actor, reason=reason)]


def mark_up(state: RoutingState, node: Any, *, actor: str = "poller") -> list[ev.Event]:
    """The node passed its health checks (the poller applies rise/fall before calling)."""
    if state.nodes[_known(state, node)].health == "up":
        return []
    return [ev.NodeUp(node=node, actor=actor)]


def mark_down(
    state: RoutingState, node: Any, cause: str, detail: str = "", *, actor: str = "poller"
) -> list[ev.Event]:
    """The node failed its health checks, for `cause` (one of `events.HEALTH_CAUSES`).
    A node already down for another cause gets a new event with the new cause: panic mode
    doubts `timeout` but never `no_responders`, so a stale cause would mislead it."""
    record = state.nodes[_known(state, node)]
    if cause not in ev.HEALTH_CAUSES:
        raise InvalidCommand(f"health cause must be one of {ev.HEALTH_CAUSES}, got {cause!r}")
    if record.health == "down" and record.health_cause == cause:
        return []
    return [ev.NodeDown(node=node, cause=cause, detail=detail, actor=actor)]


def reconcile_config(
    state: RoutingState, recorded: dict[str, Any], source: str, *, actor: str = "config"
) -> list[ev.Event]:
    """The events that apply a (re)loaded configuration file.

    The file is diffed against the last configuration recorded in the log, not against
    the current state: a node the file added, removed or changed since then is added,
    removed or changed; what the file did not touch stays as admin commands left it (a
    weight an operator set survives a restart). The new configuration is recorded last,
    also setting the watermarks. `recorded` is `Config.recorded()`.
    """
    before = {node["id"]: node for node in (state.config or {}).get("nodes", [])}
    after = {node["id"]: node for node in recorded["nodes"]}
    events: list[ev.Event] = []
    for node_id, node in after.items():
        if before.get(node_id) == node:
            continue  # unchanged in the file: whatever the state says now stands
        if node_id not in state.nodes:
            events += add_node(state, node_id, node["ip"], node["port"], node["weight"],
                               actor=actor, reason=f"in {source}")
            continue
        old = before.get(node_id, {})
        if (old.get("ip"), old.get("port")) != (node["ip"], node["port"]):
            events += change_address(state, node_id, node["ip"], node["port"], actor=actor,
                                     reason=f"changed in {source}")
        if old.get("weight") != node["weight"]:
            events += set_weight(state, node_id, node["weight"], actor=actor,
                                 reason=f"changed in {source}")
    for node_id in before:
        if node_id not in after and node_id in state.nodes:
            events += remove_node(state, node_id, actor=actor, reason=f"not in {source}")
    if recorded != state.config:
        events.append(ev.ConfigReloaded(source=source, config=recorded, actor=actor))
    return events


def observe_load(
    state: RoutingState, node: Any, connections: Any, capacity: Any, *,
    load_step: float = DEFAULT_LOAD_STEP, actor: str = "poller",
) -> list[ev.Event]:
    """A pulled load figure: recorded only when routing would notice.

    A report becomes a `load_reported` event when it is the first, when capacity changed,
    when connections moved by at least `load_step` of capacity since the last recorded
    figure (a dead band, so a count wobbling around a boundary does not fill the log), or
    when it crosses a watermark, which also yields `node_overloaded` / `node_recovered`
    with the figures that crossed.
    """
    record = state.nodes[_known(state, node)]
    for name, value, low in (("connections", connections, 0), ("capacity", capacity, 1)):
        if type(value) is not int or not low <= value <= core_ext.MAX_COUNT:
            raise InvalidCommand(
                f"node {node!r}: {name} must be an int in {low}..{core_ext.MAX_COUNT}, "
                f"got {value!r}"
            )
    overloaded = core_ext.overloaded_after(
        record.overloaded, connections, capacity, state.high_ppm, state.low_ppm
    )
    moved = (
        record.capacity is None
        or capacity != record.capacity
        or abs(connections - record.connections) >= load_step * capacity
    )
    events: list[ev.Event] = []
    if moved or overloaded != record.overloaded:
        events.append(ev.LoadReported(
            node=node, connections=connections, capacity=capacity, actor=actor
        ))
    if overloaded and not record.overloaded:
        events.append(ev.NodeOverloaded(
            node=node, connections=connections, capacity=capacity,
            high_watermark=state.high_watermark, actor=actor,
        ))
    elif record.overloaded and not overloaded:
        events.append(ev.NodeRecovered(
            node=node, connections=connections, capacity=capacity,
            low_watermark=state.low_watermark, actor=actor,
        ))
    return events
