"""A member's copy of the routing state: the fold of the shared stream, kept current.

The state is only ever changed by folding stored records, through the journal's one fold
routine, in stream order: so the same `state_seq` is the same state on every member, and
a member's own writes reach its state the same way as everyone else's. A consumer that
falls silent while the stream holds more (its server died, say) is replaced and the fold
goes on from the last record it applied; damage in the stream stops it for good."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import partial

from dispatcher.domain.errors import DomainError
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog.errors import LogCorrupted, LogUnavailable, UnsupportedFormat
from dispatcher.eventlog.jetstream import JetStreamLog
from dispatcher.eventlog.records import Record
from dispatcher.eventlog.retention import HistoryTrimmed
from dispatcher.journal import Rebuilt, SnapshotMismatch, fold

log = logging.getLogger("imdispatch.cluster")
IDLE = 0.5  # seconds without a record before the tail looks at whether it is stalled
FATAL = (LogCorrupted, UnsupportedFormat, SnapshotMismatch, DomainError)


class StreamTail:
    """Folds the stream from where `rebuilt` ended, for ever. `on_batch(records)` runs
    after each batch is applied (settings, waiting writers)."""

    def __init__(self, rebuilt: Rebuilt, on_batch: Callable[[list[Record]], None]) -> None:
        self.state: RoutingState = rebuilt.state
        self.seq, self.hash = rebuilt.seq, rebuilt.hash
        self.head = rebuilt.seq  # the stream's last seq, as far as this member knows
        self.failure: BaseException | None = None  # the stream is damaged: no more folding
        self.problem: str | None = None  # why the tail is not following now, until it is
        self.trimmed: HistoryTrimmed | None = None  # the records it needs were purged
        self.progressed = time.monotonic()  # when the last record was applied
        self._on_batch = on_batch
        self._moved = asyncio.Event()

    def adopt(self, rebuilt: Rebuilt) -> None:
        """Start from `rebuilt` instead (a joining member's snapshot plus the records
        after it); before `run`."""
        old, self.state = self.state, rebuilt.state
        self.seq, self.hash = rebuilt.seq, rebuilt.hash
        self.head = max(self.head, rebuilt.seq)
        old.selector.close()  # gives its ledger slots back

    def saw(self, seq: int) -> None:
        """The stream holds `seq` (an append was acknowledged there, say)."""
        self.head = max(self.head, seq)

    async def run(self, log_of: Callable[[], JetStreamLog | None]) -> None:
        """Follow the stream of the current session's log (`log_of()`; None while there
        is no connection) until cancelled or the stream turns out damaged."""
        attempt = 0
        while True:
            stream, start = log_of(), self.seq
            if stream is None:  # between connections
                await asyncio.sleep(0.05)
                continue
            if stream is not None:
                try:
                    await fold(partial(self._batches, stream), self.state, self.hash, None)
                except HistoryTrimmed as exc:  # purged past us: the member joins afresh
                    self.trimmed = exc
                    log.warning("the event stream was trimmed past this member: %s", exc)
                    return
                except FATAL as exc:
                    self.failure = exc
                    log.error("stopped following the event stream: %s", exc)
                    self._moved.set()
                    return
                except Exception as exc:  # a stalled consumer, a lost connection, ...
                    if self.problem != str(exc):
                        log.warning("following the event stream again: %s", exc)
                    self.problem = str(exc) or type(exc).__name__
            attempt = 0 if self.seq > start else min(attempt + 1, 5)
            await asyncio.sleep(0.05 * 2 ** attempt)

    async def _batches(self, stream: JetStreamLog, after: int) -> AsyncIterator[list[Record]]:
        async for batch in stream.follow(after, IDLE):
            if not batch:
                self._check_stalled()
                continue
            yield batch  # the fold applies it before asking for the next
            last = batch[-1]
            self.seq, self.hash = last.seq, last.hash
            self.head = max(self.head, self.seq + stream.behind)
            self.progressed, self.problem = time.monotonic(), None
            self._on_batch(batch)
            self._moved.set()

    def _check_stalled(self) -> None:
        if self.head > self.seq and time.monotonic() - self.progressed > 2 * IDLE:
            raise StalledTail(f"no record delivered for {2 * IDLE:g} s while the stream "
                              f"holds {self.head - self.seq} more")
        if self.head <= self.seq:
            self.progressed = time.monotonic()

    @property
    def lag(self) -> int:
        """Records the stream holds that this state has not applied, as far as known."""
        return max(0, self.head - self.seq)

    async def reach(self, seq: int, timeout: float) -> None:
        """Return once the state has applied `seq`; `Behind` after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.seq < seq:
            if self.failure is not None:
                raise Damaged(f"the event stream cannot be followed past seq {self.seq}: "
                              f"{self.failure}; nothing is recorded until it is repaired "
                              "(imdispatch verify --nats ... --stream ... names the record)"
                              ) from self.failure
            self._moved.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Behind(f"the event stream did not reach seq {seq} within "
                             f"{timeout:g} s (this member is at {self.seq})")
            try:
                await asyncio.wait_for(self._moved.wait(), remaining)
            except TimeoutError:
                continue


class StalledTail(Exception):
    """The consumer delivers nothing though the stream holds more: replaced."""


class Damaged(LogUnavailable):
    """The stream holds a record this member cannot fold."""


class Behind(LogUnavailable):
    """This member's state did not reach a seq in time (the stream is slow or away)."""
