"""A follower worker: it serves picks from a copy of the routing state that it keeps by
reading the event log as the leader writes it (so its state lags the log by at most one
tail interval), and sends admin commands to the leader. It has its own NATS connection
for its instance of the `imdispatch` micro service (picks over NATS survive the leader's
death), and never polls. Its settings come from the log
too (the last `config_reloaded`), never from the file, so every worker runs with the
same ones."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from dispatcher import config as cfg
from dispatcher import leader_link
from dispatcher.domain.state import NodeRecord, RoutingState
from dispatcher.eventlog.filelog import LogReader, LogTail
from dispatcher.eventlog.snapshots import SnapshotStore
from dispatcher.journal import rebuild
from dispatcher.nats_service import ServiceLink
from dispatcher.query import PickRequest
from dispatcher.serving import Serving
from dispatcher.stats import WorkerStats
from imnode.tasks import cancel_and_wait

log = logging.getLogger("imdispatch.follower")
TAIL_INTERVAL = 0.05
ASK_TIMEOUT = 1.0


class LeaderLogFailed(Exception):
    """The leader reported that its event log failed."""


class Follower(Serving):
    role = "follower"

    def __init__(self, config: cfg.Config, config_path: str | Path | None = None,
                 stats: WorkerStats | None = None) -> None:
        super().__init__(config, stats)
        self.config_path = config_path
        self._state = RoutingState()
        self._tail: LogTail | None = None
        self._following: asyncio.Task | None = None
        self._leader_failure: str | None = None  # the leader's event log failed: why
        self._leader_link_fault: str | None = None  # the leader's NATS link is dead: why
        self._status: leader_link.LeaderStatus | None = None  # the latest one read
        self._cycle: float | None = None  # the leader's last cycle this state has caught up to
        self.link = ServiceLink(self, config.nats)

    @property
    def state(self) -> RoutingState:
        return self._state

    async def start(self) -> None:
        self._state, seq, last_hash = await asyncio.to_thread(self._rebuild)
        self._take_settings()
        self._tail = LogTail(self.config.eventlog.path, seq, last_hash)
        self._start_pacing()
        self._following = asyncio.get_running_loop().create_task(self._follow())
        self.link.start()
        log.info("following the event log from seq %d", seq)

    def _rebuild(self) -> tuple[RoutingState, int, bytes]:
        """The newest snapshot that fits, plus the records after it: the journal's own
        fold (run in a thread, on a loop of its own, so a big log does not stall serving)."""
        path = Path(self.config.eventlog.path)
        rebuilt = asyncio.run(rebuild(LogReader(path).read, SnapshotStore(path / "snapshots")))
        for note in rebuilt.notes:
            log.warning("%s", note)
        return rebuilt.state, rebuilt.seq, rebuilt.hash

    async def _follow(self) -> None:
        failed: str | None = None  # the error said last: each one once, not every 50 ms
        while True:
            try:
                self._apply_tail()
                if failed is not None:
                    log.warning("following the event log again")
                failed = None
            except Exception as exc:  # keep serving the last state; say so
                if repr(exc) != failed:
                    log.exception("cannot follow the event log")
                failed = repr(exc)
            self.take_cycle()
            await asyncio.sleep(TAIL_INTERVAL)

    def _apply_tail(self) -> int:
        """Apply what the leader appended since the last look; how many events."""
        applied = 0
        for record in self._tail.poll():
            event = record.event()
            self._state.apply(event)
            applied += 1
            if event.type == "config_reloaded":
                self._take_settings()
        return applied

    def choose(self, request: PickRequest) -> list[NodeRecord]:
        """As every worker does; but before refusing a client, read the log's tail: the
        leader may have just recorded what makes a node available (its first poll, a
        node coming back), which the 50 ms tail has not reached yet."""
        chosen = super().choose(request)
        if chosen or self._tail is None:
            return chosen
        try:
            caught_up = self._apply_tail()
        except Exception:  # the follow loop says why, once
            return chosen
        if caught_up:
            self.take_cycle()
            chosen = super().choose(request)
        return chosen

    def take_cycle(self) -> None:
        """Once the leader has polled and this state has that cycle's events, it is as
        fresh as the leader's: refresh the load figures and count the age from there."""
        self._status = status = leader_link.read_status(self.config)
        if (status is not None and status.last_cycle != self._cycle
                and status.seq <= self._state.seq):
            self._cycle = status.last_cycle
            self.poll_happened()

    def _take_settings(self) -> None:
        """The settings the leader recorded with the last configuration it applied (slow
        start, panic threshold, assignment rate, retry and staleness bounds)."""
        try:
            self.config = self.config.with_recorded(self._state.config)
        except cfg.ConfigError as exc:
            log.error("keeping the previous settings: %s", exc)

    def poll_status(self) -> tuple[float | None, bool]:
        """As old as the leader's last cycle that this state has caught up to: a follower
        still applying a cycle's events is not fresh yet (it would answer from nodes
        whose health it does not know)."""
        status = self._status
        age = None if self._cycle is None else max(0.0, time.time() - self._cycle)
        return age, bool(status is not None and status.nats_connected)

    async def ask_leader(self) -> None:
        """Learn whether the leader's event log failed or its NATS link delivers nothing
        (then this worker's state stops following the truth too, so it is not ready
        either); asked before each
        readiness answer, so that it says so at once. An unreachable leader is no log
        failure: a follower takes over within a second."""
        try:
            status, body = await asyncio.wait_for(self.admin("status", {}, "dispatcher"),
                                                  ASK_TIMEOUT)
        except TimeoutError:  # a leader too busy to answer: keep what it said last
            return
        if status == 200:
            self._leader_failure = body["failure"]
            self._leader_link_fault = body.get("link_fault")

    def link_fault(self) -> str | None:
        if self._leader_link_fault is None:
            return None
        return f"in the leader worker: {self._leader_link_fault}"

    def log_failure(self) -> BaseException | None:
        if self._leader_failure is None:
            return None
        return LeaderLogFailed(f"in the leader worker: {self._leader_failure}")

    async def admin(self, op: str, args: dict[str, Any], actor: str) -> tuple[int, Any]:
        return await leader_link.forward_admin(self.config, op, args, actor)

    async def reload(self) -> list[str]:
        status, body = await self.admin("reload", {}, "config")
        if status != 200:
            raise cfg.ConfigError(body.get("error", f"reload failed ({status})"))
        return body["changes"]

    async def stop(self) -> None:
        await cancel_and_wait(self._following, self._pacing)
        await self.link.close()
