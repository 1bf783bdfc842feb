"""Reading a file event log for people and scripts: replay, audit, verify.

These work on a log directory without taking the writer's lock, so they can run beside a
live dispatcher (a record being written at that moment shows up as a torn tail).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dispatcher.domain.events import Event
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog.base import Recovery
from dispatcher.eventlog.errors import LogCorrupted
from dispatcher.eventlog.filelog import FileLog, LogReader
from dispatcher.eventlog.records import GENESIS_HASH
from dispatcher.eventlog.segments import TornTail, list_segments
from dispatcher.eventlog.snapshots import SnapshotStore


def snapshot_store(log: str | os.PathLike) -> SnapshotStore:
    """Snapshots live in the log directory's `snapshots/` folder."""
    return SnapshotStore(Path(log) / "snapshots")


def replay(log: str | os.PathLike, until: int | None = None) -> tuple[RoutingState, LogReader]:
    """Fold the whole log (or up to seq `until`) into a fresh state, verifying every record.

    Snapshots are not used: an audit should rest on the records alone.
    """
    state = RoutingState()
    reader = LogReader(log)
    for record in reader.records():
        if until is not None and record.seq > until:
            break
        state.apply(record.event())
    return state, reader


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


def audit(
    log: str | os.PathLike, *, node: str | None = None, kind: str | None = None
) -> Iterator[Event]:
    for event in LogReader(log).events():
        if (node is None or event.node_id == node) and (kind is None or event.type == kind):
            yield event


@dataclass(slots=True)
class Verification:
    records: int = 0
    segments: int = 0
    last_seq: int = 0
    head_hash: bytes = GENESIS_HASH
    torn: TornTail | None = None
    snapshots: list[str] = field(default_factory=list)  # one line per snapshot checked
    bad_snapshots: int = 0


def verify(log: str | os.PathLike) -> Verification:
    """Check every record's checksum, sequence and hash chain, replay every event, and
    compare each snapshot with the state its records build.

    Raises `LogCorrupted` naming the first bad record (or a `DomainError` for a record
    whose event does not fit the state before it).
    """
    result = Verification(segments=len(list_segments(Path(log))))
    reader = LogReader(log)
    candidates = snapshot_store(log).candidates(2**63)
    wanted = {s.seq: s for s, _, _ in candidates if s is not None}
    state = RoutingState()
    built: dict[int, tuple[bytes, dict]] = {}
    for record in reader.records():
        state.apply(record.event())
        result.records += 1
        result.last_seq, result.head_hash = record.seq, record.hash
        if record.seq in wanted:
            built[record.seq] = (record.hash, state.to_dict())
    result.torn = reader.torn
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
    "LogCorrupted", "Verification", "audit", "recover", "replay", "snapshot_store", "verify",
]
