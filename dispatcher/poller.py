"""The poller: every interval, ask every node for its status over NATS, all at once, and
turn what it learns into events (health changes, load reports, overload)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.nuid import NUID

from dispatcher.config import BalanceConfig, PollConfig
from dispatcher.domain import decisions
from dispatcher.domain.health import Failure, HealthTracker, NodeStatus, parse_status
from dispatcher.journal import Journal
from imnode.tasks import cancel_and_wait

log = logging.getLogger("imdispatch.poller")


def nats_inbox() -> str:
    return f"_INBOX.imdispatch.{NUID().next().decode()}"


class Poller:
    def __init__(self, nc: Any, journal: Journal, poll: PollConfig, balance: BalanceConfig,
                 after_cycle: Callable[[], None] | None = None) -> None:
        self.nc = nc
        self.journal = journal
        self.poll = poll
        self.balance = balance
        self.health = HealthTracker(poll.rise, poll.fall)
        self.cycles = 0
        self.last_cycle: float | None = None  # monotonic time the last full cycle ended
        self.last_duration = 0.0
        self.failures: dict[str, int] = {}  # poll failures by cause, since start
        self.after_cycle = after_cycle
        self._inbox = nats_inbox()
        self._round = 0
        self._subscription: Any = None
        self._collect: tuple[str, dict[str, Any], int, asyncio.Event] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad cycle must not end polling
                log.exception("poll cycle failed")
            await asyncio.sleep(max(0.0, self.poll.interval - (time.monotonic() - started)))

    async def cycle(self) -> bool:
        """Poll every node once and record what changed; False if NATS is unavailable
        (then nothing is concluded: an unreachable broker says nothing about the nodes)."""
        if not self.nc.is_connected:
            return False
        started = time.monotonic()
        state = self.journal.state
        node_ids = list(state.nodes)
        results = await self._ask_all(node_ids)
        if results is None or not self.nc.is_connected:
            return False  # lost NATS during the cycle: its failures prove nothing
        events = []
        for node_id, result in zip(node_ids, results, strict=True):
            record = state.nodes.get(node_id)
            if record is None or result is None:
                continue  # removed meanwhile, or a NATS error rather than a node's
            if isinstance(result, Failure):
                self.failures[result.cause] = self.failures.get(result.cause, 0) + 1
            change = self.health.observe(node_id, result, record.health)
            if change == "down":
                events += decisions.mark_down(state, node_id, result.cause, result.detail)
            elif change == "up":
                events += decisions.mark_up(state, node_id)
            if isinstance(result, NodeStatus):
                events += decisions.observe_load(state, node_id, result.connections,
                                                 result.capacity,
                                                 load_step=self.balance.load_step)
        if events:
            await self.journal.record(events)
        self.cycles += 1
        self.last_cycle = time.monotonic()
        self.last_duration = self.last_cycle - started
        if self.after_cycle is not None:
            self.after_cycle()
        return True

    async def _ask_all(self, node_ids: list[str]) -> list[NodeStatus | Failure] | None:
        """Ask every node at once: one publish each with a reply subject on this poller's
        inbox, then collect until every node answered or the timeout passed (a scatter:
        cheaper than a request and a future per node). A node nobody subscribes for gets
        the server's "no responders" status at once. None if NATS failed meanwhile."""
        self._round += 1
        prefix = f"{self._inbox}.{self._round}."
        replies: dict[str, Any] = {}
        complete = asyncio.Event()
        self._collect = (prefix, replies, len(node_ids), complete)
        try:
            if self._subscription is None:
                self._subscription = await self.nc.subscribe(f"{self._inbox}.*.*",
                                                             cb=self._on_reply)
            for node_id in node_ids:
                await self.nc.publish(f"imnode.{node_id}.status", b"", reply=prefix + node_id)
            await self.nc.flush(timeout=self.poll.timeout)
            if node_ids:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(complete.wait(), self.poll.timeout)
        except Exception as exc:  # connection closed, reconnecting, ...: not the nodes
            log.debug("status requests failed: %r", exc)
            return None
        finally:
            self._collect = None
        return [self._verdict(node_id, replies.get(node_id)) for node_id in node_ids]

    async def _on_reply(self, msg: Any) -> None:
        collect = self._collect
        if collect is None or not msg.subject.startswith(collect[0]):
            return  # a late reply to an earlier cycle
        prefix, replies, expected, complete = collect
        replies[msg.subject[len(prefix):]] = msg
        if len(replies) >= expected:
            complete.set()

    def _verdict(self, node_id: str, msg: Any) -> NodeStatus | Failure:
        if msg is None:
            return Failure("timeout", f"no status reply within {self.poll.timeout:g} s")
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            return Failure("no_responders", f"nobody answers imnode.{node_id}.status")
        return parse_status(node_id, msg.data)
