"""Pacing new clients per node: slow start and a cap on assignments per second.

Both are per worker and follow from the routing state and the clock, so they need no
events: a restarted worker computes the same ramps from the nodes' `health_since`.
"""

from __future__ import annotations

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
    """At most `rate` clients a second per node, per worker (a second's worth, and at
    least one, at once), so a reconnect storm after a node dies is spread over the
    survivors instead of piling onto the emptiest. A node that used up its allowance is
    excluded from picks until it may take a client again.

    A token bucket kept as GCRA (one "due" time per node instead of tokens and a clock),
    so a pick costs a dict lookup and an addition."""

    def __init__(self) -> None:
        self._limits: dict[str, tuple[float, float]] = {}  # node -> (interval, tolerance)
        self._due: dict[str, float] = {}  # node -> when its allowance is fully spent
        self.blocked: dict[str, float] = {}  # node -> when it may take a client again

    def set_rates(self, rates: dict[str, float | None]) -> None:
        """Each node's clients a second (None: no cap). Nodes not named are forgotten; a
        node whose rate changed starts afresh with a full allowance (its old "due" time
        was counted at the old rate, and could keep it blocked long after a raise)."""
        limits = {node_id: (1.0 / rate, (max(rate, 1.0) - 1.0) / rate)
                  for node_id, rate in rates.items() if rate is not None}
        changed = {n for n, limit in self._limits.items() if limits.get(n) != limit}
        self._limits = limits
        for table in (self._due, self.blocked):
            for node_id in [n for n in table if n in changed or n not in limits]:
                del table[node_id]

    def refill(self, now: float) -> None:
        """Unblock nodes that may take a client again (call before picking)."""
        for node_id, free_at in list(self.blocked.items()):
            if free_at <= now:
                del self.blocked[node_id]

    def took(self, node_id: str, now: float) -> None:
        """A client was handed to `node_id`; block it if that used up its allowance."""
        limit = self._limits.get(node_id)
        if limit is None:
            return
        interval, tolerance = limit
        due = self._due.get(node_id, now)
        due = (due if due > now else now) + interval
        self._due[node_id] = due
        if due - tolerance > now:
            self.blocked[node_id] = due - tolerance


def assign_rate(record: NodeRecord, configured: float) -> float | None:
    """Clients a second for this node: the configured rate, else a tenth of its
    capacity; None (no cap) while its capacity is unknown."""
    if configured > 0:
        return configured
    if record.capacity is None:
        return None
    return max(1.0, record.capacity / DERIVED_RATE_DIVISOR)


class AddressLimit:
    """At most `rate` get-tcp-ip requests a second from one client address (a second's
    worth, at least one, at once), per worker; the same GCRA as the assignment cap.
    Addresses not seen for a while are forgotten, so memory stays bounded."""

    FORGET_AT = 10_000  # remembered addresses past which the ones back to full are dropped

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.tolerance = (max(rate, 1.0) - 1.0) / rate
        self._due: dict[str, float] = {}
        self._swept_at = float("-inf")

    def allow(self, address: str, now: float) -> float:
        """0 if this request may go on, else the seconds until one may."""
        due = self._due.get(address, now)
        if due - self.tolerance > now:
            return due - self.tolerance - now
        if len(self._due) >= self.FORGET_AT and now - self._swept_at > self.interval + \
                self.tolerance:
            # at most once per allowance period: every entry older than that is back to
            # full, so the table holds at most one period's worth of addresses, and the
            # sweep costs O(1) per request on average even when nothing can be dropped
            self._due = {a: d for a, d in self._due.items() if d > now}
            self._swept_at = now
        self._due[address] = (due if due > now else now) + self.interval
        return 0.0

