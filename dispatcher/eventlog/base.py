"""What every event log backend offers the journal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dispatcher.eventlog.errors import LogCorrupted
from dispatcher.eventlog.records import Entry, Record
from dispatcher.eventlog.segments import TornTail


@dataclass(slots=True)
class Recovery:
    """What opening a log found and did."""

    last_seq: int = 0
    torn: TornTail | None = None  # an unfinished final write, truncated
    salvaged: LogCorrupted | None = None  # damage dropped because salvage was asked for
    dropped_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        lines = list(self.notes)
        if self.torn is not None:
            lines.append(f"{self.torn.describe()}: truncated")
        if self.salvaged is not None:
            lines.append(
                f"salvaged: {self.salvaged}; dropped {self.dropped_bytes} bytes from there on"
            )
        return lines


class EventLog(Protocol):
    """An append-only, hash-chained sequence of events, numbered from 1."""

    last_seq: int  # the last seq appended (encoded), durable or not yet
    last_hash: bytes  # that record's hash
    max_payload: int  # the largest event (encoded) one record holds

    async def open(self) -> Recovery:
        """Become a writer and recover the tail; raises if the log is damaged.

        The file log locks out other writers here; JetStream lets several replicas open
        the stream and refuses a stale one at its next append (`StaleWriter`).
        """

    def append(self, entries: Sequence[Entry]) -> asyncio.Future:
        """Queue encoded events whose seq continue the log; await for durability per
        policy. Raises (changing nothing) for an entry out of sequence or over
        `max_payload`. Framing happens before this returns, so `last_seq` and `last_hash`
        are current.
        """

    async def sync(self) -> None:
        """Make what was appended so far durable now, whatever the fsync policy."""

    def read(self, after: int = 0) -> AsyncIterator[list[Record]]:
        """Verified records with seq > `after`, in order, in batches."""

    @property
    def failure(self) -> BaseException | None:
        """Why appends stopped, if they did (the state is then ahead of the log)."""

    async def close(self) -> None:
        """Make everything appended durable (per policy) and give up the writer's role."""
