"""What every dispatcher worker does, leader or follower: answer picks from its copy of
the routing state, pace new clients per node, and say how fresh its state is."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from dispatcher import config as cfg
from dispatcher import pacing
from dispatcher.domain import decisions
from dispatcher.domain.state import NodeRecord, RoutingState
from dispatcher.query import PickRequest
from dispatcher.stats import WorkerStats

log = logging.getLogger("imdispatch")
UNCERTAIN = ("timeout", "bad_reply")
"""Down causes that panic mode doubts (see `Serving.update_panic`)."""
NO_NODE = "no IM node can take a client now"


class Refusal(NamedTuple):
    """Why a pick found no node, as HTTP (503) and NATS (error 503) both say it."""

    reason: str  # the metric label: "no_node" or "excluded"
    message: str
    retry_after: int  # seconds, with jitter

    def body(self) -> bytes:
        """The JSON of the 503: {"error", "retry_after"}."""
        return orjson.dumps({"error": self.message, "retry_after": self.retry_after})


class Serving:
    """What every worker does: answer picks from its copy of the routing state, with
    slow start and the per-node assignment cap; readiness from how fresh the state is."""

    role = "serving"
    poller: Any = None  # the workers that poll have one
    journal: Any = None  # the workers that record have one (`commit(decide)`)

    def __init__(self, config: cfg.Config, stats: WorkerStats | None = None) -> None:
        self.config = config
        self.stats = stats if stats is not None else WorkerStats()
        self._paced: Any = None  # the selector update_pacing last set rates on
        self.ledger: Any = None  # where picks are counted, once pacing started
        self._ramping: set[str] = set()
        self._pacing: asyncio.Task | None = None
        self.opened_at: float | None = None
        self.panic = False
        self._encoded: dict[tuple[str, str, int], bytes] = {}

    @property
    def state(self) -> RoutingState:
        raise NotImplementedError

    def _start_pacing(self, shared: bool = True) -> None:
        """Once the state is in hand: count picks in the ledger this worker shares with
        the others of its dispatcher (unless not `shared`: then its own, which its own
        reports settle), then pace them."""
        self.ledger = pacing.open_ledger(reports=self.role == "leader" or not shared,
                                         shared=shared)
        self.state.use_ledger(self.ledger)
        self.opened_at = time.monotonic()
        self._pacing = asyncio.get_running_loop().create_task(self._slow_start())

    def poll_status(self) -> tuple[float | None, bool]:
        """(seconds since the last full poll cycle or None, NATS connected)."""
        raise NotImplementedError

    def log_failure(self) -> BaseException | None:
        return None

    def link_fault(self) -> str | None:
        """Why this worker's NATS link is not trusted now (the leader's poller found it
        delivers nothing), or None."""
        return None

    async def _apply_config(self, config: cfg.Config) -> list:
        """Record what the file `config` changes against the last recorded configuration,
        then run with the recorded settings (the ones every other worker takes from the
        log). A configuration taken from the log (`cfg.FROM_LOG`: a takeover, a replaced
        worker) changes nothing: the log is newer than any copy of the file a worker
        holds. In cluster mode every member does this at its start: once one has
        recorded the file, the others find nothing to change."""
        events: list = []
        if config.source != cfg.FROM_LOG:
            recorded = config.recorded()
            events = await self.journal.commit(
                lambda state: decisions.reconcile_config(state, recorded, config.source))
        self.config = config.with_recorded(self.state.config)
        self._retune_poller()
        return events

    def _retune_poller(self) -> None:
        """Give this worker's poller, if it polls, the settings in force."""
        if self.poller is not None:
            poll, balance = self.config.poll, self.config.balance
            self.poller.poll, self.poller.balance = poll, balance
            self.poller.health.rise, self.poller.health.fall = poll.rise, poll.fall

    def share(self) -> int:
        """How many pick for the same nodes without seeing each other's picks until the
        next report: each takes that share of every node's headroom and assignment rate
        (1: the workers of one dispatcher share one ledger)."""
        return 1

    def details(self) -> dict[str, Any]:
        """What this kind of worker adds to its readiness details."""
        return {}


    def choose(self, request: PickRequest) -> list[NodeRecord]:
        """The node for one new client, then distinct backups; [] when none can take one.

        Only the first is an assignment: it takes its round-robin turn and counts against
        the node's watermark and assignment cap, for every worker (the ledger). Backups are
        the nodes the rotation would choose next; they take nothing, since the client goes
        there only if the first fails, and then asks again with `exclude`."""
        selector = self.state.selector
        if selector is not self._paced:  # new (a watermark change rebuilds it): rates first
            self.update_pacing()
        node_id = selector.pick(request.exclude)
        if node_id is None:
            return []
        nodes = self.state.nodes
        if request.count == 1:
            return [nodes[node_id]]
        others = selector.backups(request.count - 1, (*request.exclude, node_id))
        return [nodes[node_id], *(nodes[other] for other in others)]

    def refusal(self, request: PickRequest) -> Refusal:
        """What to say when `choose(request)` found nothing. A client that excluded every
        node that could take it (it failed to reach them) is told so: that is not the
        cluster being full, and it is counted apart."""
        excluded = set(request.exclude)
        nodes = self.state.nodes.values()
        if excluded and nodes:
            if all(record.id in excluded for record in nodes):
                return Refusal("excluded", "every node is excluded by the request",
                               self.retry_after())
            able = [r.id for r in nodes if r.health == "up" and not r.draining]
            if able and excluded.issuperset(able):
                return Refusal("excluded", "every node that is up is excluded by the request",
                               self.retry_after())
        return Refusal("no_node", NO_NODE, self.retry_after())

    def answer(self, chosen: list[NodeRecord], backups: bool) -> bytes:
        """The get-tcp-ip JSON body: {"node","ip","port"} and, if asked, "backups".

        Each node's part is encoded once and kept (keyed by its address, so a change of
        address makes a new one): the hot path only joins bytes."""
        parts = self._encoded
        pieces = []
        for record in chosen:
            key = (record.id, record.ip, record.port)
            piece = parts.get(key)
            if piece is None:
                if len(parts) > 4 * len(self.state.nodes) + 16:
                    parts.clear()  # addresses changed many times: start afresh
                piece = parts[key] = orjson.dumps(
                    {"node": record.id, "ip": record.ip, "port": record.port})
            pieces.append(piece)
        if not backups:
            return pieces[0]
        return pieces[0][:-1] + b',"backups":[' + b",".join(pieces[1:]) + b"]}"

    def update_pacing(self) -> None:
        """Give nodes that came up recently their growing share (slow start) and every
        node its assignment cap. Run after every poll cycle, so a node that just came up
        starts small at once, and four times a second, so its share grows smoothly."""
        configured = self.config.balance.assign_rate
        selector = self._paced = self.state.selector
        share = self.share()
        if selector.share != share:
            selector.set_share(share)
        now = time.time()
        slow_start = self.config.balance.slow_start
        for node_id, record in self.state.nodes.items():
            rate = pacing.assign_rate(record, configured)
            selector.set_rate(node_id, None if rate is None else rate / share)
            ramp = pacing.slow_start_ramp(record, now, slow_start)
            if ramp < pacing.RAMP_FULL or node_id in self._ramping:
                selector.set_ramp(node_id, ramp)
                if ramp < pacing.RAMP_FULL:
                    self._ramping.add(node_id)
                else:
                    self._ramping.discard(node_id)
        self._ramping &= set(self.state.nodes)
        self.update_panic()

    def poll_happened(self, fresh: Mapping[str, int] | None = None) -> None:
        """A poll cycle ended: every node's load is known afresh, so the picks counted as
        pending before the nodes were asked are in it. Report the recorded figures again,
        which clears those, even for nodes whose load moved too little to record an event;
        otherwise pending would pile up on a node with a steady load until it looked full.
        The leader also has each node's exact count from this cycle (`fresh`, node id ->
        connections), a little fresher than the recorded one (`load_step`): the ledger
        counts from that. (Only the leader's reports write the ledger; a follower's
        refresh its own weights and overload flags.)"""
        selector = self.state.selector
        for node_id, record in self.state.nodes.items():
            if record.capacity is not None:
                selector.report(node_id, record.connections, record.capacity)
                if fresh and node_id in fresh:
                    selector.settle(node_id, fresh[node_id])
        self.update_pacing()

    def update_panic(self) -> None:
        """Panic mode, after Envoy's panic threshold: when fewer than `panic_threshold` of
        the nodes that are not drained are up, health checks are more likely wrong than
        that many nodes dead (the dispatcher's own link may be the broken one), so nodes
        down for an uncertain cause (timeout, bad reply) take clients again. Nodes not
        seen yet do not count. Nodes whose
        process is gone (no responders), that are draining, that answer with another
        identity or were never seen up stay out: those signals are sure."""
        nodes = [r for r in self.state.nodes.values()
                 if not r.draining and r.health != "unknown"]  # judged nodes only
        up = sum(record.health == "up" for record in nodes)
        panic = bool(nodes) and up / len(nodes) < self.config.balance.panic_threshold
        if panic != self.panic:
            log.warning("panic mode %s: %d of %d nodes up (panic_threshold %s)",
                        "entered" if panic else "left", up, len(nodes),
                        self.config.balance.panic_threshold)
            self.panic = panic
        selector = self.state.selector
        for record in nodes:
            if record.health == "down":
                doubted = panic and record.seen_up and record.health_cause in UNCERTAIN
                selector.set_up(record.id, doubted)

    async def _slow_start(self) -> None:
        while True:
            self.update_pacing()
            await asyncio.sleep(0.25)

    def retry_after(self) -> int:
        """Seconds a refused client should wait, with jitter so they do not return at once."""
        base = self.config.http.retry_after
        return random.randint(base, 2 * base)

    def snapshot(self) -> dict[str, Any]:
        """What /metrics and the dashboard show of this worker, copied on the event loop
        (they are rendered in a thread, and the state changes on the loop)."""
        ready, details = self.readiness()
        return {"role": self.role, "ready": ready, "details": details,
                "nodes": self.state.node_views(),
                "changes": [event.to_dict() for event in self.state.changes]}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready once the state is in hand (a poll cycle done, or a replayed state with
        nodes) and not older than `stale_after`, and not while the NATS link is known to
        deliver nothing (the state can only get older then)."""
        now = time.monotonic()
        age, nats_connected = self.poll_status()
        stale_after = self.config.poll.stale_after
        failure = self.log_failure()
        details = {
            "role": self.role,
            "panic": self.panic,
            "nats_connected": nats_connected,
            "state_seq": self.state.seq,
            "nodes": len(self.state.nodes),
            "last_poll_age_s": None if age is None else round(age, 3),
            "stale_after_s": stale_after,
            "event_log": "failed" if failure is not None else "ok",
            **self.details(),
        }
        if failure is not None:
            return False, {**details, "reason": f"event log failed: {failure}"}
        fault = self.link_fault()
        if fault is not None:
            return False, {**details, "reason": fault}
        if age is None:
            known = any(record.health != "unknown" for record in self.state.nodes.values())
            if known and self.opened_at is not None and now - self.opened_at < stale_after:
                return True, {**details, "reason": "replayed state, first poll pending"}
            return False, {**details, "reason": "no poll cycle yet"}
        if age > stale_after:
            return False, {**details, "reason": f"state is {age:.1f} s old"}
        return True, details
