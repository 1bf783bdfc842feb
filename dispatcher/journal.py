"""The journal: the one writer of routing state.

It stamps events with their seq and time, encodes each once, applies what the log will
store and hands those bytes to the event log, and takes snapshots; on start it rebuilds the
state from the newest usable snapshot plus the log's tail. An event the log would refuse
(over its record limit) or that does not fit the state changes neither. If the log fails
later (a full disk, its directory gone), `failure` says so and the dispatcher must stop
being ready (its state is ahead of what is durable).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import orjson

from dispatcher.domain.errors import DomainError
from dispatcher.domain.events import Event, from_dict
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog.base import EventLog, Recovery
from dispatcher.eventlog.errors import LogClosed, LogCorrupted
from dispatcher.eventlog.records import GENESIS_HASH, Entry, Record, check_size
from dispatcher.eventlog.retention import HistoryTrimmed, check_continues, unanchored
from dispatcher.eventlog.snapshots import Snapshot, SnapshotStore

DEFAULT_SNAPSHOT_EVERY = 10_000
QUIET = {"load_reported"}  # logged at debug: one per load change
UNLOGGED_FIELDS = {"type", "seq", "time", "actor", "reason", "node", "config"}
log = logging.getLogger("imdispatch.events")


def _log_when_durable(events: list[Event], durable: asyncio.Future) -> None:
    """Log the events once the log holds them, even if whoever awaited is gone."""
    if not durable.cancelled() and durable.exception() is None:
        for event in events:
            log_event(event)


def log_event(event: Event) -> None:
    """Each recorded event once, in the one process that records it, with its fields."""
    level = logging.DEBUG if event.type in QUIET else logging.INFO
    if not log.isEnabledFor(level):
        return
    details = {key: value for key, value in event.to_dict().items()
               if key not in UNLOGGED_FIELDS}
    log.log(level, "%s%s by %s%s", event.type, f" {event.node_id}" if event.node_id else "",
            event.actor, f" ({event.reason})" if event.reason else "",
            extra={"event": event.type, "seq": event.seq, "node": event.node_id,
                   "actor": event.actor, "reason": event.reason, **details})


@dataclass(slots=True)
class StartReport:
    """How the journal rebuilt its state on open."""

    recovery: Recovery
    snapshot_seq: int | None = None  # the snapshot replay started from, if any
    replayed: int = 0  # events applied from the log
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        start = f"snapshot at seq {self.snapshot_seq}" if self.snapshot_seq else "an empty state"
        return [
            *self.recovery.describe(),
            *self.notes,
            f"state rebuilt from {start} plus {self.replayed} events in {self.seconds:.3f} s",
        ]


class SnapshotMismatch(Exception):
    """A snapshot that does not fit the log's records: skipped, the log is the truth."""


@dataclass(slots=True)
class Rebuilt:
    """The state a reader built from the log, and where the log ended."""

    state: RoutingState
    seq: int
    hash: bytes  # the hash of record `seq`
    replayed: int = 0  # events applied from the log
    snapshot_seq: int | None = None  # the snapshot replay started from, if any
    notes: list[str] = field(default_factory=list)  # snapshots skipped, and why


async def rebuild(
    read: Callable[[int], AsyncIterator[list[Record]]],
    snapshots: SnapshotStore | None,
    *,
    end: tuple[int, bytes] | None = None,
    selector_class: type | None = None,
) -> Rebuilt:
    """The routing state a log holds: the newest snapshot that fits plus the records
    after it, else every record from the first. The one fold that every reader of the log
    uses (the journal at start, follower workers), so they build the same state.

    `read(after)` gives the verified records after a seq, in batches. `end` (the last seq
    and its hash), when the reader knows it, is where the records must end. A snapshot
    that does not fit is skipped with a note; damage in the log itself raises.
    """
    notes = []
    candidates = snapshots.candidates(end[0] if end else 2**63) if snapshots else []
    for snapshot, path, problem in candidates:
        if snapshot is None:
            notes.append(f"skipped snapshot {path.name}: {problem}")
            continue
        try:
            state = RoutingState.from_dict(snapshot.state, selector_class)
            if state.seq != snapshot.seq:
                raise SnapshotMismatch(f"its state is at seq {state.seq}, not {snapshot.seq}")
            rebuilt = await fold(read, state, snapshot.hash, end)
        except (SnapshotMismatch, HistoryTrimmed) as exc:  # the latter: its records are gone
            notes.append(f"skipped snapshot {path.name}: {exc}")
            continue
        except (KeyError, TypeError, ValueError, AttributeError, DomainError) as exc:
            notes.append(f"skipped snapshot {path.name}: it does not fit: {exc!r}")
            continue
        rebuilt.snapshot_seq = snapshot.seq
        break
    else:
        try:
            rebuilt = await fold(read, RoutingState(selector_class), GENESIS_HASH, end)
        except HistoryTrimmed as exc:  # a bounded history starts at a snapshot, none fits
            raise unanchored("the event log", exc.start, notes) from None
    rebuilt.notes = notes
    return rebuilt


async def fold(
    read: Callable[[int], AsyncIterator[list[Record]]], state: RoutingState,
    start_hash: bytes, end: tuple[int, bytes] | None,
) -> Rebuilt:
    """Apply the records after `state.seq`, checking they chain from `start_hash`, up
    to `end` or, for a reader that never ends (a cluster member following the stream),
    for ever."""
    seq, last_hash, count = state.seq, start_hash, 0
    if end is not None and end[0] == seq:
        if end[1] != start_hash:
            raise SnapshotMismatch(f"its hash differs from the log's record {seq}")
        return Rebuilt(state, seq, start_hash)
    apply, decode, loads = state.apply, from_dict, orjson.loads
    async for batch in read(seq):
        if not count:
            check_continues(seq, batch)
        if batch[0].prev_hash != last_hash:
            raise SnapshotMismatch(f"the log's record {seq} has another hash")
        for record in batch:
            try:
                event = decode(loads(record.payload))
            except orjson.JSONDecodeError:
                event = record.event()  # raises MalformedEvent, naming the record
            apply(event)
        count += len(batch)
        seq, last_hash = batch[-1].seq, batch[-1].hash
    if end is not None and seq != end[0]:
        raise LogCorrupted(f"replay ended at seq {seq} but the log ends at {end[0]}",
                           segment="", offset=0, seq=seq + 1)
    return Rebuilt(state, seq, last_hash, count)


def stamp(events: Sequence[Event], state: RoutingState, max_payload: int,
          now: float) -> tuple[list[Event], list[Entry], Exception | None]:
    """Number, time and encode events after `state`, applying each to it as the log will
    store it (decoded from the very bytes the log gets): the events that fit, their
    entries, and the error that stopped the rest (too large, or not fitting the state)."""
    stamped: list[Event] = []
    entries: list[Entry] = []
    for event in events:
        try:
            entry = Entry.of(dataclasses.replace(event, seq=state.seq + 1, time=now))
            check_size(entry, max_payload)
            event = entry.event()
            state.apply(event)  # unchanged if it does not fit
        except Exception as exc:
            return stamped, entries, exc
        stamped.append(event)
        entries.append(entry)
    return stamped, entries, None


class Journal:
    def __init__(
        self,
        log: EventLog,
        snapshots: SnapshotStore | None = None,
        *,
        snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
        clock: Callable[[], float] = time.time,
        selector_class: type | None = None,
    ) -> None:
        self.log = log
        self.snapshots = snapshots
        self.snapshot_every = snapshot_every
        self.clock = clock
        self._selector_class = selector_class
        self.state = RoutingState(selector_class)
        self._snapshot_seq = 0
        self._snapshot_task: asyncio.Task | None = None
        self._closing = False

    # -- start-up ---------------------------------------------------------------------

    async def open(self) -> StartReport:
        started = time.perf_counter()
        report = StartReport(await self.log.open())
        try:
            await self._rebuild(report)
        except BaseException:
            with contextlib.suppress(Exception):  # give the writer's role back
                await self.log.close()
            raise
        report.seconds = time.perf_counter() - started
        return report

    async def _rebuild(self, report: StartReport) -> None:
        if self.snapshots is not None:
            for name in self.snapshots.discard_after(report.recovery.last_seq):
                report.notes.append(f"removed snapshot {name}: past the log's end")
        rebuilt = await rebuild(self.log.read, self.snapshots,
                                end=(self.log.last_seq, self.log.last_hash),
                                selector_class=self._selector_class)
        report.notes += rebuilt.notes
        report.snapshot_seq, report.replayed = rebuilt.snapshot_seq, rebuilt.replayed
        self._snapshot_seq = rebuilt.snapshot_seq or 0
        self.state = rebuilt.state

    # -- recording --------------------------------------------------------------------

    async def commit(self, decide: Callable[[RoutingState], Sequence[Event]]) -> list[Event]:
        """The one road from a decision to recorded events, for every caller (poller,
        admin, reload) and both backends: `decide` reads the state and returns what
        changes (raising a domain error to refuse). This log has one writer, so the
        state it decided on is the one the events follow; the cluster's writer
        (`dispatcher.cluster.writer`) decides again when another replica wrote first."""
        events = decide(self.state)
        return await self.record(events) if events else []

    async def read_barrier(self) -> None:
        """Nothing to wait for: with one writer, this state is the log's (the cluster's
        writer folds what other replicas wrote first)."""

    async def record(self, events: Sequence[Event]) -> list[Event]:
        """Stamp, encode, apply and log events; returns them stamped once durable per
        fsync policy.

        Each event is encoded once and checked against the log's limit before anything
        changes; what is applied is those bytes decoded, and the log is handed the same
        bytes, so the live state is exactly what a replay will build. If an event cannot
        be stored or does not fit the state, it changes nothing, the ones before it are
        still recorded, and the error is raised after. All this happens before the first
        await, so concurrent callers never interleave.
        """
        if self._closing:
            raise LogClosed("the journal is closing; routing state changes are refused")
        if self.log.failure is not None:
            raise LogClosed("the event log failed; routing state changes are refused")
        stamped, entries, error = stamp(events, self.state, self.log.max_payload, self.clock())
        if entries:
            durable = self.log.append(entries)
            self._maybe_snapshot(durable)
            durable.add_done_callback(partial(_log_when_durable, stamped))
            await asyncio.shield(durable)  # a cancelled caller must not cancel the write
        if error is not None:
            raise error
        return stamped

    def _maybe_snapshot(self, durable: asyncio.Future) -> None:
        if (
            self.snapshots is None
            or self.state.seq - self._snapshot_seq < self.snapshot_every
            or (self._snapshot_task is not None and not self._snapshot_task.done())
        ):
            return
        snapshot = Snapshot(self.state.seq, self.log.last_hash, self.state.to_dict())
        self._snapshot_seq = snapshot.seq
        self._snapshot_task = asyncio.get_running_loop().create_task(
            self._save_snapshot(snapshot, durable)
        )

    async def _save_snapshot(self, snapshot: Snapshot, durable: asyncio.Future) -> None:
        await asyncio.shield(durable)
        await self.log.sync()  # never a snapshot ahead of what is on disk, whatever the policy
        await asyncio.to_thread(self.snapshots.save, snapshot)

    @property
    def failure(self) -> BaseException | None:
        return self.log.failure

    async def close(self) -> None:
        """Flush the log and leave a snapshot of the final state for a fast next start.

        The log is closed (and its lock released) even if the last snapshot failed; a
        failed log raises here, and then no final snapshot is written.
        """
        self._closing = True
        try:
            if self._snapshot_task is not None:
                with contextlib.suppress(Exception):  # a missed snapshot only costs start-up time
                    await self._snapshot_task
        finally:
            await self.log.close()
        if self.snapshots is not None and self.state.seq > self._snapshot_seq:
            snapshot = Snapshot(self.state.seq, self.log.last_hash, self.state.to_dict())
            await asyncio.to_thread(self.snapshots.save, snapshot)
            self._snapshot_seq = snapshot.seq
