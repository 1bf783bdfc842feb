"""The selector's state as plain data: per-node views and the save/restore format.

Both implementations produce and read exactly this format, so a state saved from the
compiled selector restores into the reference one and back (used by replay and by tests).
"""

from collections.abc import Iterable, Mapping
from typing import Any

from core_ext import _rules
from core_ext.errors import InvalidArgument, InvalidArgumentType

FORMAT_VERSION = 1

SAVED_FIELDS = (
    "id", "weight", "current_weight", "up", "draining", "overloaded",
    "connections", "capacity", "pending", "ramp",
)
"""What `state()` keeps per node; effective weight and eligibility are derived from these."""

MAX_CURRENT = 10**15
"""Bound on a saved current weight (real ones stay below nodes * max effective weight)."""

NodeRow = tuple[str, int, int, bool, bool, bool, int | None, int | None, int, int]


def node_view(
    nid: str, weight: int, effective: int, current: int, up: bool, draining: bool,
    overloaded: bool, eligible: bool, connections: int | None, capacity: int | None,
    pending: int, ramp: int,
) -> dict[str, Any]:
    """One node as `Selector.node()` returns it; effective_weight in static-weight units."""
    return {
        "id": nid,
        "weight": weight,
        "effective_weight": effective / _rules.WEIGHT_SCALE,
        "current_weight": current,
        "up": up,
        "draining": draining,
        "overloaded": overloaded,
        "eligible": eligible,
        "connections": connections,
        "capacity": capacity,
        "pending": pending,
        "ramp": ramp,
    }


def dump(high: float, low: float, views: Iterable[Mapping[str, Any]],
         share: int = 1) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "high_watermark": high,
        "low_watermark": low,
        "share": share,
        "nodes": [{field: view[field] for field in SAVED_FIELDS} for view in views],
    }


def _mapping(what: str, value: Any, fields: Iterable[str],
             optional: Iterable[str] = ()) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgumentType(f"{what} must be a mapping, got {type(value).__name__}")
    expected, allowed = set(fields), set(fields) | set(optional)
    if not expected <= set(value) <= allowed:
        missing = sorted(expected - set(value))
        unknown = sorted(map(str, set(value) - allowed))
        raise InvalidArgument(f"{what}: missing fields {missing}, unknown fields {unknown}")
    return value


def _row(index: int, raw: Any) -> NodeRow:
    node = _mapping(f"selector state node #{index}", raw, SAVED_FIELDS)
    nid = _rules.node_id(node["id"])
    current = node["current_weight"]
    if type(current) is not int or abs(current) > MAX_CURRENT:
        raise InvalidArgument(
            f"node {nid!r}: current_weight must be an int within ±{MAX_CURRENT}, got {current!r}"
        )
    connections, capacity = node["connections"], node["capacity"]
    if (connections is None) != (capacity is None):
        raise InvalidArgument(f"node {nid!r}: connections and capacity must both be set or null")
    if capacity is not None:
        connections = _rules.count(nid, "connections", connections, 0)
        capacity = _rules.count(nid, "capacity", capacity, 1)
    return (
        nid,
        _rules.weight(nid, node["weight"]),
        current,
        _rules.flag(nid, "up", node["up"]),
        _rules.flag(nid, "draining", node["draining"]),
        _rules.flag(nid, "overloaded", node["overloaded"]),
        connections,
        capacity,
        _rules.count(nid, "pending", node["pending"], 0),
        _rules.ramp(nid, node["ramp"]),
    )


def parse(state: Any) -> tuple[Any, Any, int, list[NodeRow]]:
    """Validate a saved state; return (high_watermark, low_watermark, share, node rows in
    order). `share` may be left out (1: a state built by hand, or by an older build).

    Watermarks and duplicate ids are checked by the selector that the rows are loaded into.
    """
    top = _mapping("selector state", state,
                   ("version", "high_watermark", "low_watermark", "nodes"), ("share",))
    if top["version"] != FORMAT_VERSION:
        raise InvalidArgument(
            f"selector state version {top['version']!r} is not supported "
            f"(this build reads version {FORMAT_VERSION})"
        )
    if not isinstance(top["nodes"], list):
        raise InvalidArgumentType("selector state: nodes must be a list")
    share = _rules.share(top.get("share", 1))
    rows = [_row(i, raw) for i, raw in enumerate(top["nodes"])]
    return top["high_watermark"], top["low_watermark"], share, rows
