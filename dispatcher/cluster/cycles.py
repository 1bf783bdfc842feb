"""How a member that does not poll hears of the leader's poll cycles, and when it may count
its pending picks afresh from one.

A member counts its own picks; a load report clears those the report already holds. The
leader asked the nodes at some moment this member cannot see, so it must never clear a
pick made after that moment (its client is in no figure yet): the member clears only the
picks made before its last sample, and settles from a cycle only if that sample is
surely older than the cycle's question. "Surely" comes from causality, not clocks: the
lease's value for a cycle was written after this member's previous read saw the value
before it, and it says how long before writing the leader asked (`asked_ago`, on the
leader's own clock). So the question came after (the previous read's sending time -
`asked_ago` - `MARGIN`), on this member's clock. When the member's last sample is newer
than that, the cycle still freshens the state but settles nothing: the picks stay
pending one more cycle, which only errs on the side of refusing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MARGIN = 0.05  # seconds: a write's way from the leader to the server, at most


@dataclass(slots=True)
class Cycle:
    """A cycle of the leader's, as the lease told it."""

    seq: int  # the leader's state seq once the cycle's events were recorded
    asked_after: float  # this member's monotonic time before which the leader had not asked
    figures: dict[str, int] = field(default_factory=dict)  # connections per node answering


class HeardCycles:
    """The lease's values as this member reads them, every tick."""

    def __init__(self) -> None:
        self.pending: Cycle | None = None  # heard of, not yet held by the state
        self.sampled_at = float("-inf")  # when this member last sampled its picks
        self._revision: int | None = None
        self._sent: float | None = None  # when the read that saw `_revision` was sent
        self._heard: Any = None

    def read(self, value: dict[str, Any] | None, revision: int | None, sent_at: float) -> None:
        """A read of the lease, sent at this member's monotonic `sent_at`."""
        if revision is None or revision == self._revision:
            self._sent = sent_at  # later reads of the same value narrow the bound
            return
        previous, self._revision, self._sent = self._sent, revision, sent_at
        cycle = (value or {}).get("cycle")
        key = ((value or {}).get("leader"), cycle)
        if cycle is None or key == self._heard:
            return
        self._heard = key
        try:
            asked_ago = max(0.0, float(value.get("asked_ago") or 0.0))
            figures = {str(node): int(count)
                       for node, count in (value.get("figures") or {}).items()}
            seq = int(value.get("seq") or 0)
        except (TypeError, ValueError, AttributeError):
            return  # not a value this build wrote: no cycle to take
        after = float("-inf") if previous is None else previous - asked_ago - MARGIN
        self.pending = Cycle(seq, after, figures)

    def due(self, seq: int) -> Cycle | None:
        """The cycle heard of, once a state at `seq` holds its events (then only once)."""
        cycle = self.pending
        if cycle is None or seq < cycle.seq:
            return None
        self.pending = None
        return cycle

    def may_settle(self, cycle: Cycle) -> bool:
        """Whether this member's last sample is older than the cycle's question."""
        return self.sampled_at <= cycle.asked_after
