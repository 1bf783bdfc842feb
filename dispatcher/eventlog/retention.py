"""Bounded history: which old events and snapshots may go, the one rule for every backend.

A history that has dropped its oldest events starts right after a snapshot (its anchor):
replay, verify and a starting dispatcher begin there. So events go only up to the OLDEST
KEPT snapshot, only in whole units (a file log's segments; whatever a backend removes at
once), and only when a limit lets them (`retain_events`, `retain_days`: a unit goes once
any non-zero limit lets it, as Kafka's retention.bytes and retention.ms do). With both
limits 0 nothing is ever dropped. Snapshots beyond `keep_snapshots` go, oldest first, but
only while a kept one that checks out anchors the history.

Pure: the backends list their units and snapshots and carry out the `Plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dispatcher.eventlog.errors import EventLogError, LogCorrupted
from dispatcher.eventlog.records import Record

DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class Retention:
    """The `[eventlog]` retention settings (see `dispatcher.config.EventLogConfig`)."""

    keep_snapshots: int = 2
    retain_events: int = 0  # 0: no count limit
    retain_days: float = 0.0  # 0: no age limit

    @classmethod
    def of(cls, eventlog: Any) -> Retention:
        """The settings of an `EventLogConfig`."""
        return cls(eventlog.keep_snapshots, eventlog.retain_events, eventlog.retain_days)

    @property
    def bounded(self) -> bool:
        """Whether any events may ever be dropped."""
        return bool(self.retain_events or self.retain_days)


@dataclass(frozen=True, slots=True)
class Unit:
    """What a backend removes at once: records `first_seq..last_seq`, the last of them
    recorded at `last_time` (seconds since the epoch)."""

    first_seq: int
    last_seq: int
    last_time: float


@dataclass(slots=True)
class Plan:
    """What goes: the first `units` units, and the snapshots at `snapshots` (oldest
    first). `anchor`: the oldest kept snapshot that checks out (None: there is none, and
    nothing may go); `start`: the first seq kept once the units are gone."""

    units: int = 0
    snapshots: list[int] = field(default_factory=list)
    anchor: int | None = None
    start: int = 1


def plan(
    retention: Retention, *, start: int, last_seq: int, units: Sequence[Unit],
    snapshots: Sequence[int], sound: Callable[[int], bool], now: float,
) -> Plan:
    """What may go from a history whose first kept seq is `start`, ending at `last_seq`.

    `units`: the removable units, oldest first, from `start` on (never the one being
    written); `snapshots`: the seqs of the stored snapshots, any order; `sound(seq)`: that
    snapshot checks out (asked lazily, oldest kept first: reading one costs).
    """
    seqs = sorted(seq for seq in set(snapshots) if seq <= last_seq)
    kept = seqs[-retention.keep_snapshots:]
    anchor = next((seq for seq in kept if seq >= start - 1 and sound(seq)), None)
    if anchor is None:  # nothing anchors what would be left: keep everything
        return Plan(start=start)
    result = Plan(snapshots=seqs[: len(seqs) - len(kept)], anchor=anchor, start=start)
    if not retention.bounded:
        return result
    oldest_time = now - retention.retain_days * DAY
    for unit in units:
        allowed = (
            (retention.retain_events and unit.last_seq <= last_seq - retention.retain_events)
            or (retention.retain_days and unit.last_time <= oldest_time)
        )
        if unit.last_seq > anchor or not allowed:
            break
        result.units += 1
        result.start = unit.last_seq + 1
    return result


class HistoryTrimmed(LogCorrupted):
    """Records asked for that the history no longer holds: it starts at seq `start`.
    Damage unless a snapshot at `start - 1` or later anchors it (then the older records
    were dropped on purpose, and a reader must begin at such a snapshot)."""

    def __init__(self, message: str, *, start: int, segment: str = "") -> None:
        super().__init__(message, segment=segment, offset=0, seq=start)
        self.start = start


class BeforeHistory(EventLogError):
    """A state asked for at a seq before where a bounded history starts (its anchor)."""


def check_continues(after: int, batch: list[Record], where: str = "the log") -> None:
    """Raise `HistoryTrimmed` unless `batch`, the first read after seq `after`, starts at
    `after + 1` (a backend whose reader starts wherever its history does)."""
    if batch and batch[0].seq != after + 1:
        raise trimmed(where, batch[0].seq, after + 1)


def trimmed(where: str, start: int, wanted: int, segment: str = "") -> HistoryTrimmed:
    """The error for a read of seq `wanted` from a history that starts at `start`."""
    return HistoryTrimmed(
        f"{where} starts at seq {start}: records {wanted}..{start - 1} are not in it",
        start=start, segment=segment)


def unanchored(where: str, start: int, notes: Sequence[str] = ()) -> HistoryTrimmed:
    """A history that starts after seq 1 with no snapshot to begin from: damage."""
    skipped = f" ({'; '.join(notes)})" if notes else ""
    return HistoryTrimmed(
        f"{where} corrupted: it starts at seq {start} and no snapshot at seq {start - 1} or "
        f"later anchors it{skipped}: records 1..{start - 1} are missing", start=start)
