"""Pacing new clients per node: slow start and a cap on assignments per second.

Both are per worker and follow from the routing state and the clock, so they need no
events: a restarted worker computes the same ramps from the nodes' `health_since`.
"""

from __future__ import annotations

from collections.abc import Iterable

from dispatcher.domain.state import NodeRecord

RAMP_FULL = 1000
RAMP_START = 50  # a node that just came up gets 5% of its weight, growing to 100%
DERIVED_RATE_DIVISOR = 10  # default cap: a tenth of a node's capacity per second


def slow_start_ramp(record: NodeRecord, now: float, slow_start: float) -> int:
    """Thousandths of its weight a node gets `now`: linear from 5% to 100% over
    `slow_start` seconds after it came up (new, or back from down); 0 turns it off."""
    if slow_start <= 0 or record.health != "up":
        return RAMP_FULL
    elapsed = now - record.health_since
    if elapsed >= slow_start:
        return RAMP_FULL
    return max(RAMP_START, min(RAMP_FULL, int(RAMP_FULL * elapsed / slow_start)))


class AssignmentLimiter:
    """A token bucket per node, per worker: at most `rate` clients a second (a second's
    worth, and at least one, at once),
    so a reconnect storm after a node dies is spread over the survivors instead of
    piling onto the emptiest. A node whose bucket is empty is excluded from picks until
    it refills."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[float, float]] = {}  # node -> (tokens, when)
        self.blocked: set[str] = set()

    def refill(self, rates: dict[str, float], now: float) -> None:
        """Unblock nodes whose bucket has a token again (call before picking)."""
        for node_id in list(self.blocked):
            rate = rates.get(node_id)
            tokens, when = self._tokens.get(node_id, (0.0, now))
            if rate is None or min(max(rate, 1.0), tokens + (now - when) * rate) >= 1:
                self.blocked.discard(node_id)

    def took(self, node_id: str, rate: float | None, now: float) -> None:
        """A client was handed to `node_id`; block it if that emptied its bucket."""
        if rate is None:
            return
        burst = max(rate, 1.0)  # at least one client, however low the rate
        tokens, when = self._tokens.get(node_id, (burst, now))
        tokens = min(burst, tokens + (now - when) * rate) - 1
        self._tokens[node_id] = (tokens, now)
        if tokens < 1:
            self.blocked.add(node_id)

    def forget(self, node_ids: Iterable[str]) -> None:
        for node_id in node_ids:
            self._tokens.pop(node_id, None)
            self.blocked.discard(node_id)


def assign_rate(record: NodeRecord, configured: float) -> float | None:
    """Clients a second for this node: the configured rate, else a tenth of its
    capacity; None (no cap) while its capacity is unknown."""
    if configured > 0:
        return configured
    if record.capacity is None:
        return None
    return max(1.0, record.capacity / DERIVED_RATE_DIVISOR)
