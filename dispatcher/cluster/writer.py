"""Writing to the shared stream: optimistic appends, decided again on conflict.

A member decides on its folded state (at seq N) and appends the events with JetStream's
expected last sequence N. If another member appended first, the stream refuses them
(`StaleWriter`); the member waits until its state holds what the other wrote, decides
again on that state and tries again. Chosen over forwarding admin commands to the
leader: an admin change works on any replica while the leader is away or stalled (during
a failover, say), there is no second path for commands to fail on, and the stream, not
timing, keeps writers from interleaving. The decision is a function so that a retry
decides afresh: a weight change that raced a poll cycle is checked against the node as
the cycle left it.

The events are stamped on a copy of the state: the member's own state changes only by
folding what the stream stored, as every other member's does."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence

from dispatcher.cluster.tail import Behind, StreamTail
from dispatcher.domain.events import Event
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog.errors import EventLogError, LogUnavailable, StaleWriter
from dispatcher.eventlog.jetstream import JetStreamLog
from dispatcher.journal import log_event, stamp

ATTEMPTS = 50  # decisions in a row beaten by other writers before giving up
FOLD_WAIT = 5.0  # seconds to wait for the member's state to hold what the stream stored
APPEND_WAIT = 10.0  # seconds to wait for the stream to acknowledge an append


class NotLeader(Exception):
    """The stream names another leader: this member's poll results are not recorded."""


def _retrieved(future: asyncio.Future) -> None:
    """Mark an append's outcome as seen, whether or not anyone still waits for it."""
    if not future.cancelled():
        future.exception()


class Contended(LogUnavailable):
    """Other writers won `ATTEMPTS` times in a row."""


class StreamWriter:
    """`commit(decide)` for a member, the journal's counterpart in cluster mode."""

    def __init__(self, tail: StreamTail, clock: Callable[[], float] = time.time) -> None:
        self.tail = tail
        self.clock = clock
        self.log: JetStreamLog | None = None  # the current connection's; None without one
        self._lock = asyncio.Lock()  # one decision at a time: a member never races itself
        self._inflight: asyncio.Future | None = None  # the last append, until it settles

    @property
    def state(self) -> RoutingState:
        return self.tail.state

    @property
    def failure(self) -> BaseException | None:
        """Damage in the stream: the state cannot follow it any more."""
        return self.tail.failure

    async def commit(self, decide: Callable[[RoutingState], Sequence[Event]], *,
                     leader: str | None = None) -> list[Event]:
        """Record what `decide` says on the latest state; the events as stored, once this
        member's state holds them. `leader`: decide only while the stream names this
        member as the leader (else `NotLeader`)."""
        async with self._lock:
            if self._inflight is not None and not self._inflight.done():
                # an append whose caller gave up waiting (a client that hung up): it may
                # still land, so the next decision waits for its outcome
                try:
                    await self._confirmed("an earlier change")
                except Behind:  # still in flight: no new append behind it
                    raise
                except EventLogError:  # refused or failed: its outcome is known
                    pass
            for attempt in range(ATTEMPTS):
                stream = self.log
                if stream is None or stream.failure is not None:
                    raise LogUnavailable("the event stream is unreachable: routing state "
                                         "changes are refused until it is back")
                await self.tail.reach(self.tail.head, FOLD_WAIT)  # what we know is there
                state = self.tail.state
                base = state.seq  # the state moves on as the tail folds: not read after
                if leader is not None and state.leader != leader:
                    raise NotLeader(f"the event stream names {state.leader!r} as the leader")
                try:
                    events = decide(state)
                except Exception:  # a refusal stands only if decided on the stream's end
                    if await self._behind(stream, base):
                        continue
                    raise
                if not events:  # so does "nothing to change"
                    if await self._behind(stream, base):
                        continue
                    return []
                stamped, entries, error = stamp(events, state.copy(), stream.max_payload,
                                                self.clock())
                if entries:
                    stream.rebase(base, self.tail.hash)
                    self._inflight = stream.append(entries)
                    self._inflight.add_done_callback(_retrieved)
                    try:
                        await self._confirmed("this change")
                    except StaleWriter:  # another writer first: hold what it wrote, again
                        self.tail.saw(base + 1)
                        await asyncio.sleep(random.uniform(0, 0.002 * attempt))  # no lockstep
                        continue
                    self.tail.saw(entries[-1].seq)
                    for event in stamped:
                        log_event(event)
                    await self.tail.reach(entries[-1].seq, FOLD_WAIT)
                if error is not None:
                    raise error
                return stamped
            raise Contended(f"other writers appended first {ATTEMPTS} times in a row; "
                            "nothing recorded")

    async def _behind(self, stream: JetStreamLog, seq: int) -> bool:
        """Whether the stream holds more than `seq` (then the tail is told to reach it):
        a decision that changes nothing, or refuses, was maybe taken on a state that has
        not yet folded another writer's change; appends need no such look (the stream
        refuses them), answers that write nothing do."""
        head = await stream.head()
        if head > seq:
            self.tail.saw(head)
            return True
        return False

    async def read_barrier(self) -> None:
        """Fold what the stream holds now before answering a read, so that a client sees
        its own writes whichever worker of a replica it reaches; best effort (an
        unreachable stream leaves the state as it is)."""
        stream = self.log
        if stream is None:
            return
        try:
            self.tail.saw(await stream.head())
            await self.tail.reach(self.tail.head, FOLD_WAIT)
        except LogUnavailable:
            pass

    async def _confirmed(self, what: str) -> None:
        """Wait for the last append's acknowledgement, `APPEND_WAIT` at most (a stream
        election takes 4-9 s); it goes on in the background after that."""
        try:
            await asyncio.wait_for(asyncio.shield(self._inflight), APPEND_WAIT)
        except TimeoutError:
            raise Behind(f"the event stream did not confirm {what} within {APPEND_WAIT:g} s; "
                         "it may still be recorded") from None
