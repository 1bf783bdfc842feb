"""Reading an event log for people and scripts: replay, audit, verify (and recover).

A history is a file log's directory or a JetStream stream (`StreamSource`). Replay, audit
and verify read either through its backend's `read` (verified records in batches), so they
do the same with both. None takes a writer's role: they run beside a live dispatcher (on a
file log, a record being written at that moment shows up as a torn tail).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.js.errors import NotFoundError

from dispatcher.config import NatsConfig
from dispatcher.domain.events import Event
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog.base import Recovery
from dispatcher.eventlog.errors import LogCorrupted, LogUnavailable, StreamConfigError
from dispatcher.eventlog.filelog import FileLog, LogReader
from dispatcher.eventlog.jetstream import JetStreamLog
from dispatcher.eventlog.records import GENESIS_HASH, Record
from dispatcher.eventlog.segments import TornTail, list_segments
from dispatcher.eventlog.snapshots import SnapshotStore
from dispatcher.journal import SnapshotMismatch, rebuild
from dispatcher.nats_service import nats_options

CONNECT_TIMEOUT = 2.0  # seconds for each NATS server to accept us: a CLI must not hang
Read = Callable[[int], AsyncIterator[list[Record]]]


@dataclass(frozen=True)
class StreamSource:
    """A history on the JetStream stream `stream` of the NATS servers in `nats`, reached
    with its credentials (the `[nats]` table's options)."""

    nats: NatsConfig
    stream: str

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
        async with _reader(source) as reader, contextlib.aclosing(reader.read(0)) as read:
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

    Snapshots are not used: an audit should rest on the records alone.
    """

    async def run() -> tuple[RoutingState, TornTail | None]:
        async with _reader(source) as reader:
            try:
                rebuilt = await rebuild(_until(reader.read, until), None)
            except SnapshotMismatch:  # with no snapshot: record 1 does not start the chain
                raise _unchained(source) from None
            return rebuilt.state, getattr(reader, "torn", None)

    return asyncio.run(run())


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
    last_seq: int = 0
    head_hash: bytes = GENESIS_HASH
    torn: TornTail | None = None
    snapshots: list[str] = field(default_factory=list)  # one line per snapshot checked
    bad_snapshots: int = 0


def verify(source: Source) -> Verification:
    """Check every record (a file log's checksum; a stream message's record format), the
    sequence numbers and the hash chain from the genesis hash, replay every event, and
    compare each snapshot of a file log with the state its records build.

    Raises `LogCorrupted` naming the first bad record (or a `DomainError` for a record
    whose event does not fit the state before it).
    """
    return asyncio.run(_verify(source))


async def _verify(source: Source) -> Verification:
    result = Verification(str(source))
    store = None if isinstance(source, StreamSource) else snapshot_store(source)
    candidates = store.candidates(2**63) if store is not None else []
    wanted = {s.seq: s for s, _, _ in candidates if s is not None}
    state = RoutingState()
    built: dict[int, tuple[bytes, dict]] = {}
    async with _reader(source) as reader:
        if store is not None:
            result.segments = len(list_segments(Path(source)))
        async for batch in reader.read(0):
            if result.records == 0 and batch[0].prev_hash != GENESIS_HASH:
                raise _unchained(source)
            for record in batch:
                state.apply(record.event())
                if record.seq in wanted:
                    built[record.seq] = (record.hash, state.to_dict())
            result.records += len(batch)
            result.last_seq, result.head_hash = batch[-1].seq, batch[-1].hash
        result.torn = getattr(reader, "torn", None)
    for snapshot, path, problem in candidates:
        if snapshot is None:
            result.snapshots.append(f"{path.name}: {problem}")
        elif snapshot.seq > result.last_seq:
            result.snapshots.append(f"{path.name}: seq {snapshot.seq} is past the log's end")
        elif built[snapshot.seq][0] != snapshot.hash:
            result.snapshots.append(f"{path.name}: hash differs from the log's record")
        elif built[snapshot.seq][1] != snapshot.state:
            result.snapshots.append(f"{path.name}: its state is not what the log's records "
                                    f"build at seq {snapshot.seq}")
        else:
            result.snapshots.append(f"{path.name}: matches the log at seq {snapshot.seq}")
            continue
        result.bad_snapshots += 1
    return result


__all__ = [
    "LogCorrupted", "Source", "StreamSource", "Verification", "audit", "connect", "recover",
    "replay", "snapshot_store", "verify",
]
