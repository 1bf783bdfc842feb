"""Reading an event log for people and scripts: replay, audit, verify (and recover).

A history is a file log's directory or a JetStream stream (`StreamSource`). Replay, audit
and verify read either through its backend's `read` (verified records in batches), so they
do the same with both. None takes a writer's role: they run beside a live dispatcher (on a
file log, a record being written at that moment shows up as a torn tail).

A bounded history (`dispatcher.eventlog.retention`) starts after seq 1, right after a
snapshot: replay and verify then begin at the oldest kept snapshot that fits (the
anchor), from any snapshot source with `candidates(max_seq)` and any `read(after)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nats
from nats.js.errors import NotFoundError

from dispatcher.config import NatsConfig
from dispatcher.domain.errors import DomainError
from dispatcher.domain.events import Event
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog.base import Recovery
from dispatcher.eventlog.errors import LogCorrupted, LogUnavailable, StreamConfigError
from dispatcher.eventlog.filelog import FileLog, LogReader
from dispatcher.eventlog.jetstream import JetStreamLog
from dispatcher.eventlog.records import GENESIS_HASH, Record
from dispatcher.eventlog.retention import (
    BeforeHistory,
    HistoryTrimmed,
    check_continues,
    unanchored,
)
from dispatcher.eventlog.segments import TornTail, list_segments
from dispatcher.eventlog.snapshots import Snapshot, SnapshotStore
from dispatcher.journal import SnapshotMismatch, fold, rebuild
from dispatcher.nats_service import nats_options

CONNECT_TIMEOUT = 2.0  # seconds for each NATS server to accept us: a CLI must not hang
Read = Callable[[int], AsyncIterator[list[Record]]]


class Snapshots(Protocol):
    """Any snapshot source: a file log's `SnapshotStore`, a stream's snapshots."""

    def candidates(self, max_seq: int) -> list[tuple[Snapshot | None, Any, str]]:
        """Snapshots up to `max_seq`, newest first: (snapshot or None, name, problem)."""


@dataclass(frozen=True)
class StreamSource:
    """A history on the JetStream stream `stream` of the NATS servers in `nats`, reached
    with its credentials (the `[nats]` table's options). `snapshots`, if given, reads the
    stream's snapshots over the reader's connection (for a bounded history's anchor);
    without it the stream is read from seq 1, snapshots unchecked."""

    nats: NatsConfig
    stream: str
    snapshots: Callable[[JetStreamLog], Awaitable[Snapshots]] | None = field(
        default=None, compare=False)

    def __str__(self) -> str:
        return f"stream {self.stream} on {','.join(self.nats.servers)}"


Source = str | os.PathLike | StreamSource
"""A file log's directory, or a stream."""


def snapshot_store(log: str | os.PathLike) -> SnapshotStore:
    """Snapshots live in the log directory's `snapshots/` folder."""
    return SnapshotStore(Path(log) / "snapshots")


# -- reading a source ------------------------------------------------------------------


async def connect(config: NatsConfig) -> Any:
    """A client connected with `config`'s credentials, or `LogUnavailable` within a few
    seconds (a connect timeout, a refused server retried once, no reconnects), unlike the
    dispatcher's `nats_service.connect`, which waits for NATS forever."""
    problems: list[Exception] = []

    async def noted(exc: Exception) -> None:  # instead of nats-py's logged traceback
        problems.append(exc)

    try:
        return await nats.connect(
            name=f"imdispatch cli {os.getpid()}", connect_timeout=CONNECT_TIMEOUT,
            allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.2,
            error_cb=noted, **nats_options(config))
    except Exception as exc:
        why = problems[-1] if isinstance(exc, nats.errors.NoServersError) and problems else exc
        text = str(why) or type(why).__name__
        if isinstance(why, TimeoutError):
            text = f"no answer within {CONNECT_TIMEOUT:g} s"
        elif "authorization violation" in text.lower():
            text = "the server refused the credentials (Authorization Violation)"
        raise LogUnavailable(
            f"cannot connect to NATS at {','.join(config.servers)}: {text}") from None


async def _stream_log(nc: Any, source: StreamSource) -> JetStreamLog:
    """The stream as a `JetStreamLog` that only reads (never opened: opening creates a
    missing stream), on the stream's own subject, whatever the writer's configuration."""
    try:
        JetStreamLog(nc, stream=source.stream)  # the name is checked where it is defined
    except ValueError as exc:
        raise StreamConfigError(f"{source}: {exc}") from None
    try:
        info = await nc.jetstream(timeout=5.0).stream_info(source.stream)
    except NotFoundError:
        raise StreamConfigError(f"no event log {source}") from None
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        raise LogUnavailable(f"{source}: JetStream does not answer (is it enabled, and may "
                             "these credentials use its API?)") from None
    subjects = info.config.subjects or []
    try:
        if len(subjects) != 1:
            raise ValueError(f"its subjects are {subjects}, not one")
        return JetStreamLog(nc, stream=source.stream, subject=subjects[0])
    except ValueError as exc:
        raise StreamConfigError(f"{source} is not an imdispatch event log: {exc}") from None


@contextlib.asynccontextmanager
async def _reader(source: Source) -> AsyncIterator[LogReader | JetStreamLog]:
    """What reads the source's verified records (`read(after)`): a `LogReader` (which
    keeps a torn tail in `torn`) or a `JetStreamLog` over a connection of its own."""
    if not isinstance(source, StreamSource):
        yield LogReader(source)
        return
    nc = await connect(source.nats)
    try:
        yield await _stream_log(nc, source)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def _snapshots(source: Source, reader: Any) -> Snapshots | None:
    """The source's snapshots: a file log's folder, or what the stream source reads."""
    if not isinstance(source, StreamSource):
        return snapshot_store(source)
    return await source.snapshots(reader) if source.snapshots is not None else None


# -- where a history starts --------------------------------------------------------------


async def first_seq(read: Read) -> int:
    """The first seq the history holds (1 for a whole or empty one): what `read(0)`
    starts with, or the start its `HistoryTrimmed` names."""
    try:
        async with contextlib.aclosing(read(0)) as batches:
            async for batch in batches:
                return batch[0].seq
    except HistoryTrimmed as exc:
        return exc.start
    return 1


def anchors(snapshots: Snapshots | None, first: int) -> list[tuple[Snapshot, str]]:
    """The snapshots that check out and could start a history whose first record is
    `first` (at `first - 1` or later), oldest first, with their names."""
    if snapshots is None or first <= 1:
        return []
    found = [(snapshot, getattr(name, "name", str(name)))
             for snapshot, name, _ in snapshots.candidates(2**63) if snapshot is not None]
    return sorted(((s, n) for s, n in found if s.seq >= first - 1), key=lambda x: x[0].seq)


@dataclass(slots=True)
class Start:
    """Where a history starts: at seq 1, or right after the snapshot `anchor`."""

    first: int = 1  # the first record kept
    anchor: int | None = None  # the seq of the snapshot it starts after
    name: str = ""  # that snapshot's name

    def describe(self) -> str | None:
        """One line for an operator, or None for a whole history."""
        if self.first <= 1:
            return None
        if self.anchor is None:
            return (f"history starts at seq {self.first} and no snapshot anchors it: "
                    f"records 1..{self.first - 1} are missing")
        kept = (f"; records {self.first}..{self.anchor} before it are kept, chain-checked"
                if self.anchor >= self.first else "")
        return (f"history starts after seq {self.anchor} (snapshot {self.name}): older "
                f"events were dropped (retention){kept}")


def history_start(source: Source) -> Start:
    """Where the history starts, anchored at its oldest kept snapshot that checks out
    (whether its records fit it, `verify` says)."""

    async def run() -> Start:
        async with _reader(source) as reader:
            first = await first_seq(reader.read)
            found = anchors(await _snapshots(source, reader), first)
        if not found:
            return Start(first)
        return Start(first, found[0][0].seq, found[0][1])

    return asyncio.run(run())


async def _from_start(read: Read) -> AsyncIterator[list[Record]]:
    """Every record the history holds, from its first (seq 1 or later)."""
    began = False
    try:
        async with contextlib.aclosing(read(0)) as batches:
            async for batch in batches:
                began = True
                yield batch
        return
    except HistoryTrimmed as exc:  # a bounded history: read from its start
        if began:
            raise
        after = exc.start - 1
    async with contextlib.aclosing(read(after)) as batches:
        async for batch in batches:
            yield batch


def _until(read: Read, until: int | None) -> Read:
    """`read`, ending after record `until`."""
    if until is None:
        return read

    async def limited(after: int) -> AsyncIterator[list[Record]]:
        async with contextlib.aclosing(read(after)) as batches:
            async for batch in batches:
                if batch[-1].seq <= until:
                    yield batch
                    continue
                if batch[0].seq <= until:
                    yield [record for record in batch if record.seq <= until]
                return

    return limited


def _batches(source: Source) -> Iterator[list[Record]]:
    """The source's verified records in batches, for callers that are not async: each
    batch is awaited in an event loop of this iterator's own, so they come as they are
    read (`audit --json` streams the events out, not the whole history at once)."""

    async def batches() -> AsyncIterator[list[Record]]:
        async with _reader(source) as reader, contextlib.aclosing(
                _from_start(reader.read)) as read:
            async for batch in read:
                yield batch

    loop = asyncio.new_event_loop()
    read = batches()
    try:
        while True:
            try:
                batch = loop.run_until_complete(anext(read))
            except StopAsyncIteration:
                return
            yield batch
    finally:
        try:
            loop.run_until_complete(read.aclose())
        finally:
            loop.close()


# -- the commands ----------------------------------------------------------------------


def replay(source: Source, until: int | None = None) -> tuple[RoutingState, TornTail | None]:
    """Fold the whole history (or up to seq `until`) into a fresh state with the journal's
    own fold (`journal.rebuild`), every record verified; also the file log's torn tail.

    Snapshots are not used, so an audit rests on the records alone, except where a
    bounded history starts: at its oldest kept snapshot that fits (`BeforeHistory` for an
    `until` before it).
    """

    async def run() -> tuple[RoutingState, TornTail | None]:
        async with _reader(source) as reader:
            read = _until(reader.read, until)
            snapshots = await _snapshots(source, reader)  # none: read from seq 1, as ever
            first = await first_seq(reader.read) if snapshots is not None else 1
            if first > 1:
                state = await _anchored(source, read, snapshots, first, until)
                return state, getattr(reader, "torn", None)
            try:
                rebuilt = await rebuild(read, None)
            except SnapshotMismatch:  # with no snapshot: record 1 does not start the chain
                raise _unchained(source) from None
            return rebuilt.state, getattr(reader, "torn", None)

    return asyncio.run(run())


async def _anchored(source: Source, read: Read, snapshots: Snapshots | None, first: int,
                    until: int | None) -> RoutingState:
    """The state of a history that starts at `first` > 1: its records folded from the
    oldest kept snapshot that fits (the anchor), up to `until`."""
    notes = []
    for snapshot, name in anchors(snapshots, first):
        if until is not None and until < snapshot.seq:
            raise BeforeHistory(
                f"{source}: history starts after seq {snapshot.seq} (snapshot {name}): "
                f"there is no state at seq {until} to replay to (the events before were "
                f"dropped); replay --until {snapshot.seq} or later")
        try:
            state = RoutingState.from_dict(snapshot.state)
            if state.seq != snapshot.seq:
                raise SnapshotMismatch(f"its state is at seq {state.seq}")
            return (await fold(read, state, snapshot.hash, None)).state
        except (SnapshotMismatch, KeyError, TypeError, ValueError, DomainError) as exc:
            notes.append(f"skipped snapshot {name}: {exc}")
    raise unanchored(str(source), first, notes)


def _unchained(source: Source) -> LogCorrupted:
    return LogCorrupted(f"event log {source} corrupted: record 1 does not link to the "
                        "start of the log (its previous-hash is not the genesis hash)",
                        segment=str(source), offset=1, seq=1)


def recover(log: str | os.PathLike, *, salvage: bool = False) -> Recovery:
    """Open the log as its writer (so not while a dispatcher has it) and recover its tail:
    what a dispatcher does at start, on its own. With `salvage`, corruption in the last
    segment is cut off too, keeping the records before it."""

    async def run() -> Recovery:
        writer = FileLog(log, salvage=salvage)
        try:
            return await writer.open()
        finally:
            await writer.close()

    if not Path(log).is_dir():
        raise FileNotFoundError(f"no event log at {log}")
    recovery = asyncio.run(run())
    for name in snapshot_store(log).discard_after(recovery.last_seq):
        recovery.notes.append(f"removed snapshot {name}: past the log's end")
    return recovery


def audit(source: Source, *, node: str | None = None, kind: str | None = None
          ) -> Iterator[Event]:
    """The history's events about `node` and of type `kind` (None: any), as they are read."""
    for batch in _batches(source):
        for record in batch:
            event = record.event()
            if (node is None or event.node_id == node) and (kind is None or event.type == kind):
                yield event


@dataclass(slots=True)
class Verification:
    source: str = ""
    records: int = 0
    segments: int | None = None  # a file log's; None for a stream
    first_seq: int = 1  # the first record kept (a bounded history's start)
    last_seq: int = 0
    head_hash: bytes = GENESIS_HASH
    torn: TornTail | None = None
    start: Start = field(default_factory=Start)  # where the history starts
    snapshots: list[str] = field(default_factory=list)  # one line per snapshot checked
    bad_snapshots: int = 0


def verify(source: Source) -> Verification:
    """Check every record (a file log's checksum; a stream message's record format), the
    sequence numbers and the hash chain from the genesis hash, replay every event, and
    compare each snapshot (a file log's, or those a `StreamSource` reads) with the state
    its records build. A bounded history is checked from its anchor: the oldest kept
    snapshot whose hash is the log's record there; the records before it only for their
    chain; a history that starts after seq 1 with no such snapshot is damage.

    Raises `LogCorrupted` naming the first bad record (or a `DomainError` for a record
    whose event does not fit the state before it).
    """
    return asyncio.run(_verify(source))


async def _verify(source: Source) -> Verification:
    result = Verification(str(source))
    async with _reader(source) as reader:
        if not isinstance(source, StreamSource):
            result.segments = len(list_segments(Path(source)))
        snapshots = await _snapshots(source, reader)  # none: read from seq 1, as ever
        first = await first_seq(reader.read) if snapshots is not None else 1
        check = _SnapshotCheck(snapshots, first)
        result.first_seq = first
        async for batch in reader.read(first - 1):
            if result.records == 0:
                check_continues(first - 1, batch, str(source))
                if first == 1 and batch[0].prev_hash != GENESIS_HASH:
                    raise _unchained(source)
                check.at(first - 1, batch[0].prev_hash)
            for record in batch:
                check.apply(record)
            result.records += len(batch)
            result.last_seq, result.head_hash = batch[-1].seq, batch[-1].hash
        result.torn = getattr(reader, "torn", None)
    if check.state is None:
        if not result.records and check.anchors:  # nothing after it to check it against
            check.at(first - 1, check.anchors[0][0].hash)
        if check.state is None:
            raise unanchored(str(source), first, [line for line in check.lines.values()])
    result.start = check.start
    result.snapshots, result.bad_snapshots = check.report(result.last_seq)
    return result


class _SnapshotCheck:
    """Verify's snapshot checks in one pass over the records: the state is built from
    genesis (a whole history) or from the first snapshot whose hash is the log's record
    at its seq (a bounded one: the anchor); each snapshot at or after it must be the
    state the records build there."""

    def __init__(self, snapshots: Snapshots | None, first: int) -> None:
        self.candidates = snapshots.candidates(2**63) if snapshots is not None else []
        self.first = first
        self.anchors = anchors(snapshots, first)
        self.start = Start(first)
        self.state: RoutingState | None = RoutingState() if first == 1 else None
        self.pending = {snapshot.seq: (snapshot, getattr(name, "name", str(name)))
                        for snapshot, name, _ in self.candidates if snapshot is not None}
        self.lines: dict[str, str] = {}  # snapshot name -> verdict
        self.bad: set[str] = set()

    def apply(self, record: Record) -> None:
        if self.state is not None:
            self.state.apply(record.event())
        if record.seq in self.pending:
            self.at(record.seq, record.hash)

    def at(self, seq: int, record_hash: bytes) -> None:
        """The snapshot at `seq` (if any) against the log, whose record `seq` has
        `record_hash`."""
        found = self.pending.pop(seq, None)
        if found is None:
            return
        snapshot, name = found
        if snapshot.hash != record_hash:
            self._judge(name, "hash differs from the log's record", bad=True)
        elif self.state is None:
            try:
                self.state = RoutingState.from_dict(snapshot.state)
                if self.state.seq != seq:
                    raise ValueError(f"its state is at seq {self.state.seq}")
            except (KeyError, TypeError, ValueError, DomainError) as exc:
                self.state = None
                self._judge(name, f"its state does not load: {exc!r}", bad=True)
                return
            self.start = Start(self.first, seq, name)
            self._judge(name, f"anchors the history at seq {seq}")
        elif self.state.to_dict() != snapshot.state:
            self._judge(name, f"its state is not what the log's records build at seq {seq}",
                        bad=True)
        else:
            self._judge(name, f"matches the log at seq {seq}")

    def _judge(self, name: str, verdict: str, *, bad: bool = False) -> None:
        self.lines[name] = f"{name}: {verdict}"
        if bad:
            self.bad.add(name)

    def report(self, last_seq: int) -> tuple[list[str], int]:
        """One line per snapshot, newest first, and how many are bad."""
        lines = []
        for snapshot, path, problem in self.candidates:
            name = getattr(path, "name", str(path))
            if snapshot is None:
                self._judge(name, problem, bad=True)
            elif snapshot.seq > last_seq:
                self._judge(name, f"seq {snapshot.seq} is past the log's end", bad=True)
            elif name not in self.lines:  # its records were dropped
                self._judge(name, f"seq {snapshot.seq} is before the history's start")
            lines.append(self.lines[name])
        return lines, len(self.bad)


__all__ = [
    "BeforeHistory", "LogCorrupted", "Snapshots", "Source", "Start", "StreamSource",
    "Verification", "anchors", "audit", "connect", "first_seq", "history_start", "recover",
    "replay", "snapshot_store", "verify",
]
