"""The selection core in pure Python: the executable specification.

Read this first. The compiled `core_ext._selector` implements exactly this behaviour with
C arrays; the test suite runs against both and a differential property test checks that
they never disagree.

Rules, in the order a pick applies them:

1. Eligible nodes are up, not draining, not overloaded, have a positive effective weight
   and are not in the caller's `exclude`.
2. Smooth weighted round-robin, as nginx's ``ngx_http_upstream_get_peer``: every eligible
   node adds its effective weight to its current weight; the largest current weight wins
   (a tie goes to the node added first); the winner subtracts the sum of the effective
   weights that took part.
3. The winner's pending count grows by one (by the share, see below). Overload is judged
   on reported connections plus pending picks, so a burst between two reports cannot push
   a node past its high watermark: once (connections + pending) / capacity reaches the high
   watermark, the node is overloaded and gets no picks until the next report. A report
   judges afresh: a node whose reported connections reached the high watermark stays
   overloaded until a report shows it below the low watermark (hysteresis); otherwise it is
   overloaded only while its connections plus the picks still pending reach the high
   watermark.
4. A node with an assignment cap (`set_rate`) takes part only while its allowance lets it
   take one more client (GCRA: a second's worth at once, then one per 1/rate seconds).

Connections plus pending picks (the node's *load*) and the cap's allowance live in a
`Ledger` (see `core_ext.ledger`): private to the selector by default, or shared by every
worker process of one dispatcher, so the watermark and the cap hold whatever the number of
processes picking. Checking a node's load and counting the pick is one atomic step per
node, so two processes never both take a node's last place.

Several selectors that cannot share a ledger (dispatcher replicas on other machines, each
with a private one) split a node's headroom instead: after `set_share(members)` every pick
counts `members` in the load and in `picks`, so a selector stops once the node's
connections plus `members` times its own pending picks reach the watermark. With M
selectors, all with share M and the same reported figures, the picks of a node between two
reports total at most M * ceil((T - connections) / M) <= T - connections + M - 1, where
T = ceil(high_watermark * capacity) is the first load the watermark refuses: at most M - 1
clients past it, whatever the order of the picks. (The bound assumes the members pick about
evenly while their clients are still connecting: a member's pending picks stand for every
member's.) `pending` in views and in `state()` is in these units, the load counted beyond
the reported connections: the clients the selector takes all members to have sent, its own
picks times the share. The assignment cap is not divided: give each member its part of the
rate with `set_rate`.

`backups(count)` names the nodes the rotation would choose next, without taking their
turns or counting them: a client's fallbacks are not where it goes.

Dynamic weight (recomputed by `report()`, `set_weight()` and `set_ramp()`, never by a
pick, so pick sequences stay deterministic between them)::

    utilisation = connections / capacity
    effective   = weight * max(0, high_watermark - utilisation) / high_watermark * ramp

where `ramp` (1 unless slow start lowers it) is a fraction given in thousandths.

A node's share of new clients is proportional to its static weight times its headroom
below the overload threshold: an empty node gets its full static weight, a node halfway to
the threshold half of it, a node at the threshold nothing. Filling nodes in proportion to
what they can still take makes loads converge to the same utilisation instead of piling
onto whichever node was static-weighted highest, and the share falls smoothly to zero at
the threshold instead of jumping. Until a node reports, its effective weight is its static
weight. All of it is integer arithmetic (see `_rules`), so both implementations agree to
the last digit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from core_ext import _rules, _snapshot
from core_ext._rules import MAX_COUNT, MAX_LOAD, PPM, RAMP_FULL, WEIGHT_SCALE
from core_ext.ledger import ASKED, DUE, INTERVAL, LOAD, MARK, PICKS, Ledger


class _Node:
    __slots__ = (
        "capacity", "cell", "connections", "current", "draining", "effective", "id", "interval",
        "latched", "overloaded", "ramp", "tolerance", "up", "weight",
    )

    def __init__(self, nid: str, weight: int, cell: int) -> None:
        self.id = nid
        self.weight = weight
        self.effective = weight * WEIGHT_SCALE
        self.current = 0
        self.up = True
        self.draining = False
        self.overloaded = False  # no picks: latched, or the load reached the high watermark
        self.latched = False  # reported over the high watermark, not yet below the low one
        self.connections: int | None = None  # None until the first report
        self.capacity: int | None = None
        self.ramp = RAMP_FULL  # thousandths of the weight while slowly starting
        self.cell = cell  # the offset of this node's slot in the ledger
        self.interval = 0  # assignment cap: nanoseconds per client; 0 = no cap
        self.tolerance = 0  # how far ahead the allowance may be spent (the burst)

    @property
    def eligible(self) -> bool:
        return self.up and not self.draining and not self.overloaded and self.effective > 0


class Selector:
    """Chooses one node per new client; see the module docstring for the rules."""

    def __init__(self, high_watermark: float = 0.9, low_watermark: float = 0.8,
                 ledger: Ledger | None = None) -> None:
        self._high, self._low = _rules.watermarks(high_watermark, low_watermark)
        self._watermarks = (high_watermark, low_watermark)
        self._nodes: list[_Node] = []  # in the order they were added: nginx's peer order
        self._index: dict[str, _Node] = {}
        self.ledger = _rules.ledger(ledger) if ledger is not None else Ledger()
        self._share = 1  # what one pick counts in the ledger (see set_share)

    # -- membership -------------------------------------------------------------------

    def add(self, node_id: str, weight: int = 1) -> None:
        """Add a node, up, with no load reported; weight 0 means it is never picked."""
        nid = _rules.node_id(node_id)
        if nid in self._index:
            raise _rules.duplicate_node(nid)
        node = _Node(nid, _rules.weight(nid, weight), self.ledger.claim(nid))
        self._nodes.append(node)
        self._index[nid] = node

    def remove(self, node_id: str) -> None:
        node = self._node(node_id)
        self._nodes.remove(node)
        del self._index[node_id]
        self.ledger.release(node.cell)

    def close(self) -> None:
        """Release every node's ledger slot (a selector replaced by another)."""
        for node in self._nodes:
            self.ledger.release(node.cell)
        self._nodes, self._index = [], {}

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._index

    def ids(self) -> list[str]:
        """Node ids in the order they were added."""
        return [node.id for node in self._nodes]

    # -- inputs -----------------------------------------------------------------------

    def set_weight(self, node_id: str, weight: int) -> None:
        node = self._node(node_id)
        node.weight = _rules.weight(node.id, weight)
        self._reweigh(node)

    def set_up(self, node_id: str, up: bool) -> None:
        node = self._node(node_id)
        node.up = _rules.flag(node.id, "up", up)

    def set_draining(self, node_id: str, draining: bool) -> None:
        node = self._node(node_id)
        node.draining = _rules.flag(node.id, "draining", draining)

    def set_ramp(self, node_id: str, ramp: int) -> None:
        """Scale the node's weight by ramp/1000 (slow start: a node that just came up gets
        a growing share); 1000 is its full weight."""
        node = self._node(node_id)
        node.ramp = _rules.ramp(node.id, ramp)
        self._reweigh(node)

    def report(self, node_id: str, connections: int, capacity: int) -> None:
        """Take a pulled load figure: clears the pending picks made before the sample
        before the last (all of them without samples), recomputes weight and overload."""
        node = self._node(node_id)
        connections = _rules.count(node.id, "connections", connections, 0)
        capacity = _rules.count(node.id, "capacity", capacity, 1)
        node.connections, node.capacity = connections, capacity
        self._settle(node, connections)
        node.latched = _rules.overloaded_after(
            node.latched, connections, capacity, self._high, self._low
        )
        # Pending picks stop a node only until the next report, which judges afresh (the
        # next pick checks the load again): a count of clients still connecting must not
        # hold it out below its watermark.
        node.overloaded = node.latched
        self._reweigh(node)

    def sample(self) -> None:
        """The nodes are being asked for their load now: the reports that follow leave
        pending the clients picked since the question before this one (those picked since
        cannot be in the answers, and those picked just before may still be connecting)."""
        ledger = self.ledger
        with ledger.locked():
            for node in self._nodes:
                ledger.set(node.cell, MARK, ledger.get(node.cell, ASKED))
                ledger.set(node.cell, ASKED, ledger.get(node.cell, PICKS))

    def settle(self, node_id: str, connections: int) -> None:
        """Count the node's load afresh from `connections`, as `report()` does, without
        changing its weight or overload state (a fresher figure than the last report)."""
        node = self._node(node_id)
        self._settle(node, _rules.count(node.id, "connections", connections, 0))

    def set_rate(self, node_id: str, per_second: float | None) -> None:
        """Cap the clients a second this node takes (None: no cap). A changed rate starts
        with a full allowance, once for every process sharing the ledger."""
        node = self._node(node_id)
        node.interval, node.tolerance = _rules.rate(node.id, per_second)
        ledger = self.ledger
        with ledger.locked():
            if ledger.get(node.cell, INTERVAL) != node.interval:
                ledger.set(node.cell, INTERVAL, node.interval)
                ledger.set(node.cell, DUE, 0)

    def set_share(self, members: int) -> None:
        """Take 1/`members` of every node's headroom: from now on a pick counts `members`
        in the ledger's load and picks (1: the whole headroom, the default), so `members`
        selectors with private ledgers, fed the same reports, fill a node to at most
        `members` - 1 clients past its watermark together. Backups count nothing, as ever.
        Setting the same value again changes nothing (a caller may set it every tick), and
        `state()` keeps it: a rebuild on a watermark change happens on every member at
        once and must not lift the bound until the share is set again."""
        self._share = _rules.share(members)

    @property
    def share(self) -> int:
        """What one pick counts in the ledger (`set_share`)."""
        return self._share

    # -- the choice -------------------------------------------------------------------

    def pick(self, exclude: Iterable[str] = (), now: int | None = None) -> str | None:
        """Return the id of the node the next client should use, or None if none can.

        `now` is CLOCK_MONOTONIC in nanoseconds (`time.monotonic_ns()`, the default), the
        clock of the assignment caps."""
        skipped = self._skipped(exclude)
        if now is None:
            now = time.monotonic_ns()
        ledger = self.ledger
        with ledger.locked():  # the check and the count are one step for other processes
            best: _Node | None = None
            total = 0
            for node in self._nodes:
                if node in skipped or not self._available(node, now):
                    continue
                node.current += node.effective
                total += node.effective
                if best is None or node.current > best.current:
                    best = node
            if best is None:
                return None
            best.current -= total
            share = self._share
            ledger.set(best.cell, PICKS, ledger.get(best.cell, PICKS) + share)
            load = ledger.get(best.cell, LOAD)
            if load < MAX_LOAD:
                load = min(MAX_LOAD, load + share)
                ledger.set(best.cell, LOAD, load)
            if best.capacity is not None and load * PPM >= self._high * best.capacity:
                best.overloaded = True
            if best.interval:
                due = ledger.get(best.cell, DUE)
                ledger.set(best.cell, DUE, max(due, now) + best.interval)
        return best.id

    def backups(self, count: int, exclude: Iterable[str] = (),
                now: int | None = None) -> list[str]:
        """Up to `count` distinct nodes the rotation would choose next, none of them in
        `exclude`: a client's fallbacks. Nothing changes: no turn is taken, no pick is
        counted, no allowance is spent."""
        count = _rules.backup_count(count)
        skipped = set(self._skipped(exclude))
        if now is None:
            now = time.monotonic_ns()
        with self.ledger.locked():
            candidates = [node for node in self._nodes
                          if node not in skipped and self._available(node, now, peek=True)]
        current = {node.id: node.current for node in candidates}
        chosen: list[str] = []
        while candidates and len(chosen) < count:
            best: _Node | None = None
            total = 0
            for node in candidates:
                current[node.id] += node.effective
                total += node.effective
                if best is None or current[node.id] > current[best.id]:
                    best = node
            current[best.id] -= total
            chosen.append(best.id)
            candidates.remove(best)
        return chosen

    # -- state ------------------------------------------------------------------------

    def node(self, node_id: str) -> dict[str, Any]:
        """A snapshot of one node's routing fields (see `_snapshot.node_view`)."""
        n = self._node(node_id)
        return _snapshot.node_view(
            n.id, n.weight, n.effective, n.current, n.up, n.draining, n.overloaded,
            n.eligible, n.connections, n.capacity, self._pending(n), n.ramp,
        )

    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this selector is (plain data)."""
        return _snapshot.dump(*self._watermarks, (
            {**self.node(n.id), "overloaded": n.latched} for n in self._nodes), self._share)

    @classmethod
    def from_state(cls, state: Mapping[str, Any], ledger: Ledger | None = None) -> Selector:
        """The inverse of `state()`: a selector whose next picks are this one's. On a
        ledger where another selector already holds a node, the load counted there is
        kept: it has every pick since, which this state cannot know."""
        high, low, share, rows = _snapshot.parse(state)
        selector = cls(high, low, ledger)
        selector._share = share
        for nid, weight, current, up, draining, overloaded, conns, cap, pending, ramp in rows:
            fresh = not selector.ledger.holds(nid)
            Selector.add(selector, nid, weight)  # not an override that may add elsewhere
            node = selector._index[nid]
            node.current = current
            node.up, node.draining, node.overloaded = up, draining, overloaded
            node.latched = overloaded
            node.connections, node.capacity, node.ramp = conns, cap, ramp
            if fresh:
                with selector.ledger.locked():
                    selector.ledger.set(node.cell, LOAD, (conns or 0) + pending)
            selector._reweigh(node)
        return selector

    def __reduce__(self) -> tuple:
        # Pickle and copy through the portable state, as the compiled selector does.
        return type(self).from_state, (self.state(),)

    @property
    def high_watermark(self) -> float:
        return self._watermarks[0]

    @property
    def low_watermark(self) -> float:
        return self._watermarks[1]

    def __repr__(self) -> str:
        return (
            f"<{type(self).__module__}.Selector nodes={len(self)} "
            f"high_watermark={self._watermarks[0]} low_watermark={self._watermarks[1]}>"
        )

    # -- internals --------------------------------------------------------------------

    def _node(self, node_id: str) -> _Node:
        try:
            node = self._index.get(node_id)
        except TypeError:  # unhashable: certainly not a node id
            node = None
        if node is None:
            raise _rules.unknown_node(node_id)
        return node

    def _skipped(self, exclude: Iterable[str]) -> Any:
        return {self._index.get(x) for x in _rules.exclusion(exclude)} if exclude else ()

    def _available(self, node: _Node, now: int, peek: bool = False) -> bool:
        """Eligible, below the high watermark by the shared load, and within its cap.
        A node found over the watermark is overloaded from now on (unless only peeking)."""
        if not node.eligible:
            return False
        if node.capacity is not None and (
            self.ledger.get(node.cell, LOAD) * PPM >= self._high * node.capacity
        ):
            if not peek:
                node.overloaded = True
            return False
        return not node.interval or self.ledger.get(node.cell, DUE) - node.tolerance <= now

    def _settle(self, node: _Node, connections: int) -> None:
        """The ledger's load from a reported figure: the picks since the sample before the
        last stay pending (all are in the figure until there were two samples). Only the handle
        that reports writes it: the others apply the same reports later, from the log."""
        ledger = self.ledger
        if not ledger.reports:
            return
        with ledger.locked():
            mark = ledger.get(node.cell, MARK)
            since = 0 if mark < 0 else max(0, ledger.get(node.cell, PICKS) - mark)
            ledger.set(node.cell, LOAD, min(MAX_LOAD, connections + since))

    def _pending(self, node: _Node) -> int:
        """The load counted beyond the node's last report: picks by every process sharing
        the ledger, each counted as the share it was made with."""
        load = self.ledger.get(node.cell, LOAD)
        return min(MAX_COUNT, max(0, load - (node.connections or 0)))

    def _reweigh(self, node: _Node) -> None:
        if node.capacity is None:
            effective = node.weight * WEIGHT_SCALE
        else:
            utilisation = node.connections * PPM // node.capacity
            headroom = max(0, self._high - utilisation)
            effective = node.weight * WEIGHT_SCALE * headroom // self._high
        node.effective = effective * node.ramp // RAMP_FULL
