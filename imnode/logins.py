"""Newest login wins: which of two logins of one uid is the newer, the same on every node.

Every login gets a `Stamp` (time, node id). Stamps are totally ordered: a node never
gives two logins the same time (its `LoginClock` only moves forward), and two nodes differ
by id. Each node holding a copy of the uid compares its stamp with the one in a notice
from another node; both sides compare the same two stamps, so exactly one of them yields,
whatever order the notices arrive in.

"Newer" must also respect what a node has seen: a login on this node after it read a
notice from a node whose clock runs ahead must still outrank that notice, or neither side
yields (the notice found no copy here to replace; our notice finds theirs newer). So the
clock is hybrid logical: a stamp is the wall time, but above every time this node has
stamped or read. And since a notice can be missed (the node was away from NATS), a node
that reads a notice older than its own copy answers with its own notice again: the node
with the older copy then learns that it lost.

Pure and synchronous: the node (imnode/server.py) carries the notices over NATS.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from imnode import protocol


class Stamp(NamedTuple):
    """When and where a login happened; tuples order by time, then node id."""

    at: float  # seconds since the epoch, as the node's `LoginClock` gave it
    node: str


class BadNotice(ValueError):
    """A login notice that is not `{"uid", "node", "at"}` with sane values."""


class Verdict(enum.Enum):
    YIELD = "yield"  # the notice is newer: close our copy
    ANSWER = "answer"  # ours is newer: announce it again, so the other node yields


class LoginClock:
    """Stamps logins on one node: wall time, but strictly above every time this node has
    stamped or observed, so a login never looks older than what its node knew of."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self.last = 0.0  # the greatest time stamped or observed

    def stamp(self, node: str) -> Stamp:
        self.last = max(self.wall(), math.nextafter(self.last, math.inf))
        return Stamp(self.last, node)

    def observe(self, stamp: Stamp) -> None:
        self.last = max(self.last, stamp.at)


def judge(held: Stamp, notice: Stamp) -> Verdict:
    """What a node holding a copy stamped `held` does about another node's `notice`."""
    return Verdict.YIELD if held < notice else Verdict.ANSWER


def encode_notice(uid: str, stamp: Stamp) -> bytes:
    return orjson.dumps({"uid": uid, "node": stamp.node, "at": stamp.at})


def decode_notice(data: bytes) -> tuple[str, Stamp]:
    """(uid, stamp) from a notice; `BadNotice` if it is malformed."""
    try:
        notice: Any = orjson.loads(data)
        uid, node, at = notice["uid"], notice["node"], notice["at"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise BadNotice(f"not a login notice: {exc}") from None
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise BadNotice(f"bad time {at!r}")
    if not isinstance(node, str) or not node:
        raise BadNotice(f"bad node {node!r}")
    try:
        uid = protocol.require_uid(uid)
    except protocol.ProtocolError as exc:
        raise BadNotice(exc.message) from None
    return uid, Stamp(float(at), node)
