"""Limits, fixed-point units and argument checks shared by both selector implementations.

One module so the compiled and the reference selector accept exactly the same input and
refuse the rest with exactly the same exception and message.
"""

import math
from typing import Any

from core_ext.errors import DuplicateNode, InvalidArgument, InvalidArgumentType, UnknownNode
from core_ext.ledger import Ledger

MAX_WEIGHT = 10_000
"""Largest static weight (nginx allows far less in practice; 10k leaves room for fine shares)."""

MAX_COUNT = 1_000_000_000
"""Largest connections or capacity figure: keeps every product below 2**63."""

MAX_LOAD = 2 * MAX_COUNT
"""Largest connections-plus-pending figure a ledger slot counts up to."""

MAX_RATE = 1_000_000_000
"""Largest assignment cap in clients a second (one nanosecond apart)."""

MAX_NODES = 10_000
"""Most nodes one dispatcher routes (the domain refuses more): the workers' shared ledger
has room for them several times over, so a valid event never finds it full."""

MAX_BACKUPS = 64
"""Most backups one call names (clients ask for a handful)."""

MAX_SHARE = 1024
"""Most members that can split a node's headroom (`Selector.set_share`): far more
dispatcher replicas times workers than any deployment runs."""

WEIGHT_SCALE = 1_000
"""Effective weights are fixed-point: a node with full headroom has weight * WEIGHT_SCALE.

Smooth weighted round-robin only compares weights with each other, so scaling all of them
by the same factor yields the same sequence as nginx with the static weights, while a
dynamic weight can still express a fraction of a static weight of 1.
"""

PPM = 1_000_000
"""Watermarks and utilisation are integer parts per million: exact, identical in C and Python."""


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def node_id(value: Any) -> str:
    if type(value) is not str:
        raise InvalidArgumentType(f"node id must be a str, got {_describe(value)}")
    if not value:
        raise InvalidArgument("node id must not be empty")
    return value


def weight(nid: str, value: Any) -> int:
    if type(value) is not int:
        raise InvalidArgumentType(
            f"node {nid!r}: weight must be an int in 0..{MAX_WEIGHT}, got {_describe(value)}"
        )
    if not 0 <= value <= MAX_WEIGHT:
        raise InvalidArgument(f"node {nid!r}: weight must be in 0..{MAX_WEIGHT}, got {value}")
    return value


def count(nid: str, name: str, value: Any, minimum: int) -> int:
    """Check a connections (minimum 0) or capacity (minimum 1) figure."""
    if type(value) is not int:
        raise InvalidArgumentType(
            f"node {nid!r}: {name} must be an int, got {_describe(value)}"
        )
    if not minimum <= value <= MAX_COUNT:
        raise InvalidArgument(
            f"node {nid!r}: {name} must be in {minimum}..{MAX_COUNT}, got {value}"
        )
    return value


RAMP_FULL = 1000
"""`set_ramp` is in thousandths of the node's weight: 1000 = full weight (slow start)."""


def ramp(nid: str, value: Any) -> int:
    if type(value) is not int:
        raise InvalidArgumentType(
            f"node {nid!r}: ramp must be an int in 0..{RAMP_FULL}, got {_describe(value)}"
        )
    if not 0 <= value <= RAMP_FULL:
        raise InvalidArgument(f"node {nid!r}: ramp must be in 0..{RAMP_FULL}, got {value}")
    return value


def flag(nid: str, name: str, value: Any) -> bool:
    # Only real bools: set_up("n1", "false") must not mean True.
    if type(value) is not bool:
        raise InvalidArgumentType(f"node {nid!r}: {name} must be a bool, got {_describe(value)}")
    return value


def watermarks(high: Any, low: Any) -> tuple[int, int]:
    """Return (high, low) in parts per million; require 0 < low <= high <= 1."""
    ppm = []
    for name, value in (("high_watermark", high), ("low_watermark", low)):
        if type(value) not in (int, float):
            raise InvalidArgumentType(f"{name} must be a number, got {_describe(value)}")
        if not (math.isfinite(value) and 0 < value <= 1 and round(value * PPM) > 0):
            raise InvalidArgument(f"{name} must be in [0.000001, 1], got {value!r}")
        ppm.append(round(value * PPM))
    if ppm[1] > ppm[0]:
        raise InvalidArgument(
            f"low_watermark ({low!r}) must not be above high_watermark ({high!r})"
        )
    return ppm[0], ppm[1]


def overloaded_after(was: bool, connections: int, capacity: int, high: int, low: int) -> bool:
    """Overload with hysteresis for a reported figure (watermarks in ppm).

    Overloaded from the high watermark up; available again only below the low one; in
    between, unchanged.
    """
    load = connections * PPM
    if load >= high * capacity:
        return True
    if load < low * capacity:
        return False
    return was


def rate(nid: str, value: Any) -> tuple[int, int]:
    """An assignment cap in clients a second (None: no cap) as GCRA's (interval,
    tolerance) in nanoseconds: one client per interval, and a second's worth (at least
    one) at once."""
    if value is None:
        return 0, 0
    if type(value) not in (int, float):
        raise InvalidArgumentType(
            f"node {nid!r}: rate must be a number or None, got {_describe(value)}")
    if not (math.isfinite(value) and 0 < value <= MAX_RATE):
        raise InvalidArgument(f"node {nid!r}: rate must be in (0, {MAX_RATE}], got {value!r}")
    interval = max(1, round(1e9 / value))
    return interval, round((max(value, 1.0) - 1.0) / value * 1e9)


def backup_count(value: Any) -> int:
    if type(value) is not int:
        raise InvalidArgumentType(f"count must be an int, got {_describe(value)}")
    if not 0 <= value <= MAX_BACKUPS:
        raise InvalidArgument(f"count must be in 0..{MAX_BACKUPS}, got {value}")
    return value


def share(value: Any) -> int:
    """`set_share`'s count of members: an int (not a bool) in 1..MAX_SHARE."""
    if type(value) is not int:
        raise InvalidArgumentType(
            f"share must be an int in 1..{MAX_SHARE}, got {_describe(value)}")
    if not 1 <= value <= MAX_SHARE:
        raise InvalidArgument(f"share must be in 1..{MAX_SHARE}, got {value}")
    return value


def ledger(value: Any) -> Any:
    if not isinstance(value, Ledger):
        raise InvalidArgumentType(f"ledger must be a core_ext.ledger.Ledger, got "
                                  f"{_describe(value)}")
    return value


def unknown_node(nid: Any) -> UnknownNode:
    return UnknownNode(f"unknown node {nid!r}")


def duplicate_node(nid: str) -> DuplicateNode:
    return DuplicateNode(f"node {nid!r} already exists")


def exclusion(value: Any) -> Any:
    """`pick(exclude=...)` takes a collection of ids; a bare str would exclude its letters."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidArgumentType(
            f"exclude must be a collection of node ids, got {_describe(value)}"
        )
    return value
