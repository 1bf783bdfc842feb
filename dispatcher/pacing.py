"""Pacing new clients per node: slow start and a cap on assignments per second.

Both follow from the routing state and the clock, so they need no events: a restarted
worker computes the same ramps from the nodes' `health_since`. The cap is counted by the
selection core in the ledger that every worker of one dispatcher shares
(`core_ext.ledger`), so it means the same whatever the number of workers.
"""

from __future__ import annotations

import os
from pathlib import Path

from core_ext.ledger import Ledger
from dispatcher.domain.state import NodeRecord
from dispatcher.stats import DIRECTORY_VARIABLE

LEDGER_FILE = "ledger"

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


def open_ledger(reports: bool, shared: bool = True) -> Ledger:
    """The counters this worker picks against: the file every worker of this `serve`
    maps (in the run's directory, which the supervisor makes when it starts several
    workers), else (or unless `shared`) counters of its own. `reports`: this worker's
    load reports reset the counts of picks (the leader's)."""
    directory = os.environ.get(DIRECTORY_VARIABLE)
    if not directory or not shared:
        return Ledger(reports=reports)
    return Ledger.shared(Path(directory) / LEDGER_FILE, reports=reports)


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

