"""One worker in cluster mode: a member of the dispatcher that every replica forms.

Every member folds the shared stream into its routing state (`StreamTail`), answers
picks from it, runs admin commands by optimistic appends (`StreamWriter`), and competes
for the lease. The one that holds it records `leader_elected` and then polls the nodes,
as the file log's leader does; the others learn from the lease's value when the leader
finished a poll cycle, which is how fresh their state is once they have folded that
cycle's events. A member's NATS connection carries all of it; when the poller finds the
link delivers nothing, the member leaves it for a new one and keeps its state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import nats
import orjson

from dispatcher import admin, nats_service
from dispatcher import config as cfg
from dispatcher.cluster.cycles import HeardCycles
from dispatcher.cluster.lease import Lease, member_id
from dispatcher.cluster.snapshots import StreamSnapshots
from dispatcher.cluster.tail import FATAL, StreamTail
from dispatcher.cluster.writer import NotLeader, StreamWriter
from dispatcher.domain import events as ev
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog import retention
from dispatcher.eventlog.errors import LogUnavailable
from dispatcher.eventlog.jetstream import JetStreamLog
from dispatcher.eventlog.records import GENESIS_HASH
from dispatcher.eventlog.retention import Retention, Unit
from dispatcher.eventlog.snapshots import Snapshot
from dispatcher.journal import Rebuilt, rebuild
from dispatcher.poller import Poller
from dispatcher.serving import Serving
from dispatcher.stats import WorkerStats
from imnode.micro import Service, close_link
from imnode.tasks import cancel_and_wait

log = logging.getLogger("imdispatch.cluster")
TICK = 0.25  # seconds between looks at the lease (its holder's last cycle, or taking it)
JOIN_WAIT = 20.0  # seconds a worker's start waits for its state (Sanic allows 30)
MEMBERS_WINDOW = 30.0  # seconds a higher count of members holds (see `_counted`)
CLOSE_WAIT = 2.0  # seconds a connection being left may take to settle its appends
ACK_WAIT = 2.0  # seconds an append waits for its ack before sending again (an election)
SUBJECT_PREFIX = "imdispatch.events."


def stream_subject(stream: str) -> str:
    """The one subject a cluster's stream captures."""
    return SUBJECT_PREFIX + stream


class Member(Serving):
    """A worker of a replica in cluster mode; see the module docstring."""

    def __init__(self, config: cfg.Config, config_path: str | Path | None = None,
                 stats: WorkerStats | None = None) -> None:
        super().__init__(config, stats)
        self.config_path = Path(config_path) if config_path else None
        self.file_config = config  # as read at start: `config` turns to the recorded one
        self.id = member_id(os.getpid())
        self.tail = StreamTail(Rebuilt(RoutingState(), 0, GENESIS_HASH), self._folded)
        self.state = RoutingState()  # no nodes: picks are refused until caught up
        self.journal = StreamWriter(self.tail)
        self.nc: Any = None
        self.lease: Lease | None = None
        self.snapshots: StreamSnapshots | None = None
        self._snapshot_seq = 0  # the last snapshot kept (or being kept) beside the stream
        self._snapshotting: asyncio.Task | None = None
        self.service: Service | None = None
        self.poller: Poller | None = None
        self.leading = False  # holds the lease (polls once the stream names it leader)
        self.members = 1  # live members: the most counted within `MEMBERS_WINDOW`
        self._counts: deque[tuple[float, int]] = deque()  # (monotonic time, count)
        self.stream_health = "not checked yet"
        self.caught_up = False  # the state reached the stream's end once since start
        self._joined = False  # the state was rebuilt from the stream (and is followed)
        self._caught = asyncio.Event()  # set with `caught_up`
        self._lease_until = 0.0  # monotonic: the lease is surely ours until then
        self._deposed: str | None = None  # why to step down, said by the poller's commit
        self._cycle_renewed: int | None = None  # as leader: the cycle the lease last said
        self._cycles = HeardCycles()  # as follower: the leader's cycles, as the lease says
        self._config_seen: Any = None  # the recorded config the settings come from
        self._fresh_at: float | None = None  # monotonic: our state held the last cycle
        self._link_lost = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        self._campaigning: asyncio.Task | None = None
        self._taking: asyncio.Task | None = None  # recording `leader_elected`, then polling

    state: RoutingState = None  # type: ignore[assignment]  # a plain attribute, not the
    # base class's property (read on every pick): the tail's state once caught up

    @property
    def role(self) -> str:  # type: ignore[override]
        return "leader" if self.leading and self.state.leader == self.id else "follower"

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Reach NATS, rebuild the state from the stream and follow it, campaign; return
        once the state has caught up with the stream (so that this worker takes no
        client before), or after `JOIN_WAIT` without NATS: then it serves, refusing picks
        and not ready, until it has caught up."""
        self._start_pacing(shared=False)  # a replica's workers share no ledger: see shares
        self._tasks = [asyncio.get_running_loop().create_task(self._sessions())]
        try:
            await asyncio.wait_for(self._caught.wait(), JOIN_WAIT)
        except TimeoutError:
            log.warning("member %s has not caught up with the event stream within %g s; "
                        "serving meanwhile, refusing picks", self.id, JOIN_WAIT)

    async def _sessions(self) -> None:
        """One NATS connection at a time, replaced when the poller finds it delivers
        nothing; the state and the tail outlive it."""
        while True:
            nc = await nats_service.connect(
                self.config.nats, error_cb=self._nats_error,
                ping_interval=nats_service.PING_INTERVAL, max_outstanding_pings=3)
            try:
                await self._open(nc)
            except Exception as exc:
                log.warning("cannot use the event stream %s: %s", self.config.eventlog.stream,
                            exc)
                await self._close(nc)
                await asyncio.sleep(1.0)
                continue
            self._campaigning = asyncio.get_running_loop().create_task(self._campaign())
            try:
                await self._link_lost.wait()
            finally:
                await cancel_and_wait(self._campaigning)
                await self._close(nc)
            self._link_lost.clear()
            log.warning("left the NATS connection; opening another")

    async def _open(self, nc: Any) -> None:
        eventlog = self.config.eventlog
        stream = JetStreamLog(nc, stream=eventlog.stream, subject=stream_subject(eventlog.stream),
                              replicas=eventlog.replicas, shared=True, writer=self.id,
                              timeout=ACK_WAIT, bounded=True,
                              purge=Retention.of(eventlog).bounded)
        recovery = await stream.open()
        for line in recovery.describe():
            log.info("event stream: %s", line)
        lease = Lease(nc.jetstream(timeout=2.0), eventlog.stream, self.id, eventlog.lease,
                      eventlog.replicas)
        await lease.open()
        snapshots = StreamSnapshots(nc.jetstream(timeout=5.0), eventlog.stream,
                                    eventlog.replicas)
        await snapshots.open()
        if not self._joined:
            try:
                await self._join(stream, snapshots)
            except FATAL as exc:  # readiness says why, not "catching up" for ever
                self.tail.failure = exc
                raise
        self.nc, self.lease, self.snapshots = nc, lease, snapshots
        self.tail.saw(stream.last_seq)
        self.journal.log = stream
        if not self.caught_up:
            await self.tail.reach(stream.last_seq, float("inf"))
            self._serve_from(self.tail.state)
            self.caught_up = True
            self._sample()  # picks from now on stay pending until a cycle surely after
            log.info("member %s caught up with the event stream at seq %d", self.id,
                     self.tail.seq)
            self._take_settings()
            try:
                await self._apply_config(self.file_config)
            except Exception as exc:  # e.g. a file the recorded state refuses: serve on
                log.error("the changes in %s were not recorded: %s", self.config.source, exc)
            self._caught.set()
        self.service = await nats_service.serve(nc, self)

    def _serve_from(self, state: RoutingState) -> None:
        """Answer picks from `state` (the tail's, once caught up: a state half way
        through the history is no state to answer from)."""
        old, self.state = self.state, state
        if old is not state:
            old.selector.close()

    async def _join(self, stream: JetStreamLog, snapshots: StreamSnapshots) -> None:
        """The state the stream holds now, from the newest snapshot that fits; then
        follow the stream from there."""
        started = time.perf_counter()
        rebuilt = await rebuild(stream.read, await snapshots.fetch())
        for note in rebuilt.notes:
            log.warning("%s", note)
        self.tail.adopt(rebuilt)
        rebuilt.state.use_ledger(self.ledger)
        if self.caught_up:  # joining again (its position was purged): serve the new one
            self._serve_from(rebuilt.state)
        self._joined = True
        self._snapshot_seq = rebuilt.snapshot_seq or 0
        log.info("member %s rebuilt the state from %s plus %d events in %.3f s", self.id,
                 f"snapshot at seq {rebuilt.snapshot_seq}" if rebuilt.snapshot_seq
                 else "an empty state", rebuilt.replayed, time.perf_counter() - started)
        self._tasks.append(asyncio.get_running_loop().create_task(
            self.tail.run(lambda: self.journal.log)))

    async def _close(self, nc: Any) -> None:
        await self._step_down(None)
        if self.journal.log is not None:  # its appends may retry for long: not waited for
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.journal.log.close(), CLOSE_WAIT)
        self.journal.log, self.lease = None, None
        service, self.service, self.nc = self.service, None, None
        await close_link(nc, service)

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._campaigning)  # it would take the lease back
        lease = self.lease
        await self._step_down(None)
        if lease is not None:
            await lease.release()  # another member leads at once, not after the lease time
        await cancel_and_wait(*self._tasks, self._pacing, self._snapshotting)
        if self.nc is not None:
            await self._close(self.nc)

    async def _nats_error(self, exc: Exception) -> None:
        if not self._stopping:
            log.warning("NATS: %s", exc or type(exc).__name__)

    # -- the lease --------------------------------------------------------------------

    async def _campaign(self) -> None:
        """Every tick: the leader renews its lease (at once after a poll cycle, so the
        others learn of it), the others read it and take it when nobody holds it; every
        member says it is alive and counts the others."""
        ttl = self.config.eventlog.lease
        renewed = alive = float("-inf")
        while True:
            now = time.monotonic()
            try:
                if now - alive >= ttl / 4:
                    await self.lease.here({"at": time.time()})
                    self._counted(await self.lease.members(), now)
                    self.stream_health = await self._stream_health()
                    alive = now
                if self._deposed is not None:
                    await self._step_down(self._deposed)
                if self.tail.trimmed is not None:  # behind a purged history: from a snapshot
                    self.tail.trimmed = None
                    await self._join(self.journal.log, self.snapshots)
                if self.leading:
                    cycle = self._cycle_mark()
                    if cycle != self._cycle_renewed or now - renewed >= ttl / 4:
                        if not await self.lease.renew(self._lease_value()):
                            await self._step_down("another member took the lease")
                        else:
                            self._lease_until, renewed = now + ttl, now
                            self._cycle_renewed = cycle
                else:
                    sent = time.monotonic()
                    holder, revision = await self.lease.holder()
                    self._cycles.read(holder, revision, sent)
                    self._take_cycle()
                    if holder is None and await self.lease.acquire(self._lease_value()):
                        self.leading, self._lease_until, self._deposed = True, now + ttl, None
                        renewed = now  # recording it may outlast the lease: renewed meanwhile
                        self._taking = asyncio.get_running_loop().create_task(self._lead())
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                log.debug("lease: %r", exc)
            if self.leading and time.monotonic() > self._lease_until:
                await self._step_down("could not renew the lease in time")
            stream = self.journal.log
            if stream is not None and stream.failure is not None:  # appends gave up: anew
                log.warning("the event stream refused appends for good (%s); reconnecting",
                            stream.failure)
                self._link_lost.set()
            await asyncio.sleep(TICK)

    def _counted(self, count: int, now: float) -> None:
        """A new count of live members. Shares follow a rise at once and a fall only
        after `MEMBERS_WINDOW`: a member whose heartbeat came late (a busy loop) or that
        just stopped must not make the others take more than their share meanwhile."""
        self._counts.append((now, max(1, count)))
        while self._counts and now - self._counts[0][0] > MEMBERS_WINDOW:
            self._counts.popleft()
        self.members = max(count for _, count in self._counts)

    async def _stream_health(self) -> str:
        """The stream as JetStream reports it: "ok" with its raft leader, or why not."""
        try:
            info = await self.nc.jetstream(timeout=1.0).stream_info(self.config.eventlog.stream)
        except Exception as exc:
            return f"unavailable: {exc!r}"
        cluster = info.cluster
        if cluster is None:
            return "ok (one server)"
        if not cluster.leader:
            return "no leader (an election is under way)"
        behind = [r.name for r in cluster.replicas or [] if not r.current]
        return f"ok (leader {cluster.leader}" + (f"; behind: {', '.join(behind)})" if behind
                                                 else ")")

    def _lease_value(self) -> dict[str, Any]:
        """What the lease says of its holder: who, its last full poll cycle, the seq its
        state had then, how long before this write it asked the nodes (its own clock),
        and what they answered (see `dispatcher.cluster.cycles`)."""
        poller = self.poller if self.leading else None
        if poller is None or poller.asked_at is None:
            return {"leader": self.id, "cycle": None, "seq": self.state.seq}
        return {"leader": self.id, "cycle": poller.cycles, "seq": self.state.seq,
                "asked_ago": round(time.monotonic() - poller.asked_at, 6),
                "figures": poller.figures}

    def _cycle_mark(self) -> int | None:
        return self.poller.cycles if self.poller is not None and self.leading else None

    def _take_cycle(self) -> None:
        """A cycle heard of, once this state holds its events: the state is as fresh as
        the leader's, and, if surely after this member's last sample, the loads settle
        from the leader's figures."""
        cycle = self._cycles.due(self.state.seq)
        if cycle is None:
            return
        self._fresh_at = time.monotonic()
        if self._cycles.may_settle(cycle):
            self._sample()
            self.poll_happened(cycle.figures)

    def _sample(self) -> None:
        self.state.selector.sample()
        self._cycles.sampled_at = time.monotonic()

    async def _lead(self) -> None:
        """Holding the lease: record it in the stream (the fence), then poll. In a task
        of its own: during a stream election recording can take seconds, and the lease
        is renewed meanwhile."""
        previous = self.state.leader
        try:
            await self.journal.commit(lambda state: [] if state.leader == self.id else [
                ev.LeaderElected(leader=self.id, reason=f"took the lease (previous leader: "
                                                        f"{previous or 'none'})")])
        except Exception as exc:  # the lease is given up: another member may do better
            log.warning("took the lease but could not record it: %s", exc)
            self._deposed = f"could not record the lead: {exc}"
            return
        with contextlib.suppress(Exception):  # the newest snapshot: the next one is due after
            kept = await self.snapshots.names()
            if kept:
                self._snapshot_seq = max(self._snapshot_seq, int(kept[-1][9:29]))
        log.warning("member %s leads: it polls the nodes and records what it sees", self.id)
        self.poller = Poller(self.nc, _AsLeader(self), self.config.poll, self.config.balance,
                             after_cycle=self._after_cycle, link_lost=self._link_lost.set)
        self.poller.start()

    async def _step_down(self, why: str | None) -> None:
        poller, self.poller = self.poller, None
        was_leading, self.leading, self._deposed = self.leading, False, None
        if self._taking is not None and self._taking is not asyncio.current_task():
            await cancel_and_wait(self._taking)
        if was_leading and self.lease is not None:
            await self.lease.release()  # a member that does not lead holds no lease
        if poller is not None:
            await poller.stop()
            self._cycles.sampled_at = time.monotonic()  # its samples were later than ours
        if was_leading and why is not None:
            log.warning("member %s no longer leads: %s", self.id, why)

    def _after_cycle(self) -> None:
        self.stats.poll_cycle.observe(self.poller.last_duration)
        self.stats.poll_failures = dict(self.poller.failures)
        self.poll_happened(self.poller.figures)

    # -- the state --------------------------------------------------------------------

    def _folded(self, batch: list[Any]) -> None:
        """After each batch the tail applied: settings recorded since, and a cycle the
        lease announced that this state now holds."""
        if self.state.config is not self._config_seen:
            self._take_settings()
        if not self.leading:
            self._take_cycle()
        elif self.state.seq - self._snapshot_seq >= self.config.eventlog.snapshot_every:
            self._snapshot()

    def _snapshot(self) -> None:
        """As leader: keep a snapshot of the state beside the stream (one at a time)."""
        if self._snapshotting is not None and not self._snapshotting.done():
            return
        snapshot = Snapshot(self.state.seq, self.tail.hash, self.state.to_dict())
        self._snapshot_seq = snapshot.seq
        self._snapshotting = asyncio.get_running_loop().create_task(
            self._save_snapshot(self.snapshots, snapshot))

    async def _save_snapshot(self, snapshots: StreamSnapshots, snapshot: Snapshot) -> None:
        try:
            await snapshots.save(snapshot)
        except Exception as exc:  # a missed snapshot only costs joining members time
            log.warning("could not keep a snapshot at seq %d: %r", snapshot.seq, exc)
            return
        try:
            await self._trim(snapshots)
        except Exception as exc:  # the history stays longer, nothing is lost
            log.warning("could not trim the event stream: %r", exc)

    async def _trim(self, snapshots: StreamSnapshots) -> None:
        """As leader, after each snapshot: the one rule of `dispatcher.eventlog.retention`.
        Purge the stream up to the oldest kept snapshot when `[eventlog]` retention lets
        it, then drop the snapshots beyond `keep_snapshots` (never the anchor). A snapshot
        anchors only if its hash is the stream's record at its seq."""
        rules = Retention.of(self.config.eventlog)
        name, js = self.config.eventlog.stream, self.nc.jetstream(timeout=5.0)
        state = (await js.stream_info(name)).state
        fetched = await snapshots.fetch(newest=len(await snapshots.names()))
        units, matching, stale, first = [], set(), [], state.first_seq
        for snapshot in sorted((s for s, _, _ in fetched.found if s is not None),
                               key=lambda found: found.seq):
            if snapshot.seq < first - 1:  # of a history already gone: no use
                stale.append(snapshot.seq)
                continue
            if snapshot.seq == first - 1:  # the anchor: checked when it became one
                matching.add(snapshot.seq)
                continue
            if snapshot.seq > state.last_seq:
                continue
            raw = await js.get_msg(name, snapshot.seq)
            if self.journal.log.record(snapshot.seq, raw.headers, raw.data).hash == \
                    snapshot.hash:
                matching.add(snapshot.seq)
            units.append(Unit(first, snapshot.seq, float(orjson.loads(raw.data)["time"])))
            first = snapshot.seq + 1
        plan = retention.plan(rules, start=state.first_seq, last_seq=state.last_seq,
                              units=units, snapshots=sorted(matching),
                              sound=matching.__contains__, now=time.time())
        if plan.start > state.first_seq:
            await js.purge_stream(name, seq=plan.start)
            log.info("event stream %s now starts at seq %d (snapshot at seq %d anchors it)",
                     name, plan.start, plan.anchor)
        await snapshots.drop(stale + plan.snapshots)

    def _take_settings(self) -> None:
        self._config_seen = self.state.config
        try:
            self.config = self.config.with_recorded(self.state.config)
        except cfg.ConfigError as exc:
            log.error("keeping the previous settings: %s", exc)
            return
        self._retune_poller()

    # -- what the app asks ------------------------------------------------------------

    async def admin(self, op: str, args: dict[str, Any], actor: str) -> tuple[int, Any]:
        """Every member runs admin commands itself (see `dispatcher.cluster.writer`)."""
        return await admin.execute(self, op, args, actor)

    async def reload(self) -> list[str]:
        if self.config_path is None:
            raise cfg.ConfigError("no config file to reload")
        config = cfg.load(self.config_path)
        if config.eventlog != self.config.eventlog:
            log.warning("[eventlog] changed in %s: takes effect at the next restart",
                        config.source)
        return [event.type for event in await self._apply_config(config)]

    async def read_events(self, after: int, limit: int) -> list[Any]:
        """`/admin/events`: the stored events after `after`, from the stream."""
        stream = self.journal.log
        if stream is None:
            raise admin.AdminError(503, "the event stream is unreachable")
        found: list[Any] = []
        try:
            async for batch in stream.read(after):
                found += [record.event().to_dict() for record in batch[:limit - len(found)]]
                if len(found) >= limit:
                    break
        except (nats.errors.Error, LogUnavailable) as exc:  # e.g. a stream election
            raise admin.AdminError(503, f"the event stream cannot be read now: {exc!r}") \
                from None
        return found

    def poll_status(self) -> tuple[float | None, bool]:
        connected = bool(self.nc is not None and self.nc.is_connected)
        if self.poller is not None and self.poller.last_cycle is not None:
            return time.monotonic() - self.poller.last_cycle, connected
        if self._fresh_at is None:
            return None, connected
        return time.monotonic() - self._fresh_at, connected

    def log_failure(self) -> BaseException | None:
        return self.tail.failure

    def link_fault(self) -> str | None:
        if not self.caught_up:
            return (f"catching up with the event stream (at seq {self.tail.seq} of "
                    f"{self.tail.head})")
        return self.poller.link_fault if self.poller is not None else None

    def share(self) -> int:
        """Every live member, workers of the same replica included (each its own
        ledger)."""
        return self.members

    def details(self) -> dict[str, Any]:
        """A stalled consumer or a stream without a leader are details, not reasons: a
        member that cannot follow the stream stops seeing the leader's cycles, so its
        state goes stale (`stale_after`) as it would without the stream; meanwhile it
        answers from the last state, as every replica does during a stream election."""
        return {"member": self.id, "leader": self.state.leader, "members": self.members,
                "stream": self.stream_health, "stream_lag": self.tail.lag,
                "following": self.tail.problem or "ok"}


class _AsLeader:
    """The journal the leader's poller records through: only while the stream names this
    member as leader. Told otherwise, the member steps down (from its own task: the
    poller cannot stop itself)."""

    def __init__(self, member: Member) -> None:
        self.member = member

    @property
    def state(self) -> RoutingState:
        return self.member.state

    @property
    def failure(self) -> BaseException | None:
        return self.member.journal.failure

    async def commit(self, decide: Any) -> list:
        member = self.member
        if not member.leading or time.monotonic() > member._lease_until:
            return []
        try:
            return await member.journal.commit(decide, leader=member.id)
        except NotLeader as exc:
            member._deposed = str(exc)
            return []
