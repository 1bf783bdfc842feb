"""Reading a node's status reply and deciding its health, as HAProxy does: a node goes up
after `rise` good replies in a row and down after `fall` bad ones; "no responders" (the
node's process is gone) and a node that says it is draining take it out at once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

import core_ext
from imnode.contract import node_address

MAX_REPLY = 64 * 1024  # a status reply is a few hundred bytes; more is not a status


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A good status reply: the figures the dispatcher routes on."""

    connections: int
    capacity: int
    accepting: bool
    draining: bool


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a status request did not give a usable status (cause as in HEALTH_CAUSES)."""

    cause: str
    detail: str

    @property
    def sure(self) -> bool:
        """Certain evidence the node cannot take clients: no need to wait for `fall`."""
        return self.cause in ("no_responders", "draining")


def _require(reply: dict[str, Any], key: str, kinds: tuple[type, ...]) -> Any:
    value = reply.get(key)
    if type(value) not in kinds:
        raise ValueError(f"`{key}` must be {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"`{key}` must be finite, got {value!r}")
    return value


def parse_status(node_id: str, data: bytes) -> NodeStatus | Failure:
    """Check a status reply from `imnode.<node_id>.status` (see docs/imnode.md)."""
    if len(data) > MAX_REPLY:
        return Failure("bad_reply", f"reply of {len(data)} bytes is larger than any status")
    try:
        reply = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return Failure("bad_reply", f"not JSON: {exc}")
    if not isinstance(reply, dict):
        return Failure("bad_reply", "not a JSON object")
    try:
        replier = _require(reply, "node_id", (str,))
        if replier != node_id:
            return Failure("identity_mismatch",
                           f"node {node_id!r} was asked, {replier[:64]!r} answered")
        try:
            node_address(_require(reply, "ip", (str,)))
        except ValueError as exc:
            raise ValueError(f"`ip` {exc}") from None
        port = _require(reply, "port", (int,))
        connections = _require(reply, "connections", (int,))
        capacity = _require(reply, "capacity", (int,))
        accepting = _require(reply, "accepting", (bool,))
        draining = _require(reply, "draining", (bool,))
        for key in ("cpu", "loop_lag_ms", "uptime_s", "ts"):
            if _require(reply, key, (int, float)) < 0:
                raise ValueError(f"`{key}` must not be negative")
        _require(reply, "version", (str,))
        if not 1 <= port <= 65535:
            raise ValueError(f"`port` must be in 1..65535, got {port}")
        if not 0 <= connections <= core_ext.MAX_COUNT:
            raise ValueError(f"`connections` must be in 0..{core_ext.MAX_COUNT}, got {connections}")
        if not 1 <= capacity <= core_ext.MAX_COUNT:
            raise ValueError(f"`capacity` must be in 1..{core_ext.MAX_COUNT}, got {capacity}")
    except ValueError as exc:
        return Failure("bad_reply", str(exc))
    if draining:
        return Failure("draining", "the node reports it is draining")
    return NodeStatus(connections, capacity, accepting, draining)


class HealthTracker:
    """Consecutive successes and failures per node; says when health should change.

    It remembers only the nodes it was last told exist (`retain`): a removed node's
    streak goes with it, so a node added again under the same id rises from nothing, and
    the table never grows past the node list."""

    def __init__(self, rise: int, fall: int) -> None:
        self.rise, self.fall = rise, fall
        self._streak: dict[str, int] = {}  # > 0: successes in a row, < 0: failures
        self._nodes: dict[str, object] = {}  # the node each streak belongs to

    def retain(self, nodes: Mapping[str, object]) -> None:
        """Keep the streaks of the nodes in `nodes` (id -> the node's record) only; a
        record that is not the one seen before is a new node under an old id."""
        for node_id, record in nodes.items():
            if self._nodes.get(node_id, record) is not record:
                self._streak.pop(node_id, None)
        for node_id in self._streak.keys() - nodes.keys():
            del self._streak[node_id]
        self._nodes = dict(nodes)

    def observe(self, node_id: str, result: NodeStatus | Failure, health: str,
                cause: str | None = None) -> str | None:
        """Record one poll result for a node whose health is now `health` (down for
        `cause`); return "up" or "down" when that should change, else None. "down" also
        when a node already down fails for another cause as surely as it takes to fall
        (a frozen node that then dies is down for `no_responders` from then on)."""
        streak = self._streak.get(node_id, 0)
        if isinstance(result, Failure):
            streak = min(streak, 0) - 1
            self._streak[node_id] = streak
            convinced = result.sure or -streak >= self.fall
            if convinced and (health != "down" or result.cause != cause):
                return "down"
            return None
        streak = max(streak, 0) + 1
        self._streak[node_id] = streak
        return "up" if health != "up" and streak >= self.rise else None
