"""The JetStream event log: one NATS JetStream stream shared by several dispatcher replicas.

Each record is one message on the stream's single subject, and the stream sequence IS the
event seq (both count from 1 without gaps). The message data is the event's orjson payload
(as in the file log); the headers carry the rest of the record:

- `Imd-Format: 1`, the record format; a reader refuses others (`UnsupportedFormat`);
- `Imd-Prev-Hash`: hex of the previous record's hash. The record's own hash is not stored:
  it is re-derived as SHA-256(seq || prev || payload), so the chain is checked, not trusted;
- `Imd-Writer`, in cluster mode: the member that appended it (for audits; not hashed);
- `Nats-Msg-Id: <stream>:<seq>:<hash prefix>` (stable per record), so JetStream's duplicate
  window recognises a resent record.

Records are published in atomic batches (JetStream's atomic batch publish, nats-server
2.12+, `allow_atomic` on the stream; `Nats-Batch-Id`, `-Sequence`, `-Commit`): the stream
stores a whole batch or none of it (a batch of one record is a plain message). The
batch's first message carries `Nats-Expected-Last-Sequence: seq - 1` and
`Nats-Expected-Stream` (JetStream refuses an expected last sequence further in a
batch), so the server stores the batch only if the stream still ends where this writer
believes it does. Two replicas cannot interleave: the one that did not read the other's
events gets `StaleWriter` and must catch up; and as a batch is all-or-nothing, a refused
writer leaves no part of it behind (with one message at a time in flight, a later message
could follow the other writer's record and break the chain). A resend whose first attempt
was stored (only its ack was lost) comes back as "duplicate message id" or "wrong last
sequence": the writer then fetches the stored record at the batch's last seq and, if it
has the same hash (which seals the batch), counts the batch as acknowledged; so a record
is never stored twice, and a batch identical to one another replica stored is no conflict.

Durability: the file log's `fsync` policy has no meaning here. An append completes when
the stream's leader acknowledged every message, which (with `replicas` > 1) means a quorum
stored it. nats-server 2.15 fsyncs a file stream when it commits an atomic batch (3 fsyncs
per commit, seen with strace: about 2 ms here); a single message is fsynced when the
server's `jetstream.sync_interval` says (2 minutes by default, or `always`): with one
replica, such an event survives a crash of the server process but not necessarily a
power cut.

Appends are encoded at once (so `last_seq`/`last_hash` are current on return, each
message's own headers included) and sent by one background task, one batch at a time: what
queued while the previous batch was in flight, as many whole appends as fit in
`max_inflight` (at most 1000) messages, written to the socket in one buffer with one ack
for the batch (an append larger than a batch spans several, each atomic). Each append's
future completes when its last message is acknowledged. A lost ack (timeout, no responders
while JetStream restarts, an incomplete batch) is retried, the whole batch again, for up
to `retry_for` seconds; any other failure stops the log (`failure`), fails what is pending
and makes later appends raise `LogClosed`.

`read` uses a push consumer of its own (memory-only, ack-less, flow-controlled) and takes
its messages as raw bytes (`natswire`): nats-py's parsing of each message into a `Msg`
costs more than checking the record. `follow`, which waits for new records for ever, uses
nats-py's ordered consumer (recreated on any gap in delivery, after missed heartbeats).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

import core_ext
from dispatcher.eventlog import natswire, records, retention
from dispatcher.eventlog.base import Recovery
from dispatcher.eventlog.errors import (
    AppendFailed,
    EventLogError,
    LogClosed,
    LogCorrupted,
    LogUnavailable,
    StaleWriter,
    StreamConfigError,
    UnsupportedFormat,
)
from dispatcher.eventlog.records import FORMAT, FORMAT_HEADER, PREV_HEADER

MessageScanner = core_ext.compiled_or_twin(
    "dispatcher.eventlog._scan", "dispatcher.eventlog._scan_py"
).MessageScanner
WRITER_HEADER = "Imd-Writer"  # which cluster member appended the record (audit only)
WRONG_LAST_SEQUENCE = (10071, 10164)  # JSStreamWrongLastSequence(Constant)Err
DUPLICATE_IN_BATCH = 10201  # JSAtomicPublishContainsDuplicateMessageErr: a resent batch
INCOMPLETE_BATCH = 10176  # JSAtomicPublishIncompleteBatchErr: part of it was lost
STREAM_NAME_IN_USE = 10058
SUBJECTS_OVERLAP = 10065
MAX_BATCH = 1000  # messages in one atomic batch: nats-server's limit
BATCH_BYTES = 8 * 1024 * 1024  # and a bound of ours on its size (one write, one proposal)
READ_BUFFER = 4096  # messages read ahead of the consumer of `read()`
READ_BATCH = 1024
READ_HEARTBEAT = 5.0  # seconds: the bulk reader's consumer (flow control needs one)
READ_RETRY = 0.2  # seconds between attempts to start a reader's consumer
RESEND_EVERY = 0.25  # seconds, at most, between resends of an unacknowledged batch: a
# stream's leader election ends at no known moment, and the first resend after it lands
HEADER_ROOM = 1024  # bytes of a message's max_payload left for its headers
_FORMAT_NEEDLE = f"\r\n{FORMAT_HEADER}:".encode()
_PREV_NEEDLE = f"\r\n{PREV_HEADER}:".encode()
_STALLED_NEEDLE = f"\r\n{api.Header.CONSUMER_STALLED.value}:".encode()
_FORMAT_LINE = f"{FORMAT_HEADER}: {FORMAT}\r\n{PREV_HEADER}: ".encode()  # + the hash's hex


def check_stream_name(name: str) -> str:
    """JetStream's rule for stream (and bucket) names; ValueError names the problem."""
    if type(name) is not str or not name or len(name) > 200:
        raise ValueError(f"must be a stream name of 1..200 characters, got {name!r}")
    bad = sorted({c for c in name if c in " .*>/\\\t" or not c.isprintable()})
    if bad:
        raise ValueError(f"a stream name cannot hold {''.join(bad)!r}, got {name!r}")
    return name


@dataclass(slots=True)
class _Outgoing:
    seq: int
    data: bytes
    lines: bytes  # the record's own header lines; a batch adds its own around them
    hash: bytes


class _Retry(Exception):
    """A problem that a retry may cure: no ack in time, no responders, not connected."""


def _record_headers(block: bytes | None) -> tuple[str | None, str | None]:
    """(Imd-Format, Imd-Prev-Hash) from a raw header block: what reading needs of it."""
    return natswire.header(block, _FORMAT_NEEDLE), natswire.header(block, _PREV_NEEDLE)


class _Feed:
    """What a bulk reader's push consumer delivered, raw: (reply, header block, data).
    JetStream pauses delivery at a flow-control request until it is answered; answering
    only while `READ_BUFFER` has room bounds what waits here."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.messages: list[tuple[bytes, bytes | None, bytes]] = []
        self.flow: list[str] = []  # flow-control requests not answered yet
        self.arrived = asyncio.Event()

    def take(self, subject: bytes, reply: bytes, block: bytes | None, data: bytes) -> None:
        if not natswire.is_status(block):
            self.messages.append((reply, block, data))
            if len(self.messages) > 1:
                return  # the reader waits only for an empty queue: it was woken already
        else:  # 100 FlowControl Request, or 100 Idle Heartbeat naming one left unanswered
            request = reply.decode(errors="replace") if reply else natswire.header(
                block, _STALLED_NEEDLE)
            if not request or "\ufffd" in request:
                return  # none, or not a subject JetStream would send
            self.flow.append(request)
        self.arrived.set()

    async def release(self) -> None:
        """Answer the flow-control requests once the reader has room."""
        while self.flow and len(self.messages) < READ_BUFFER:
            await self.nc.publish(self.flow.pop(0), b"")

    async def wait(self, timeout: float) -> bool:
        """Wait for something to arrive; False after `timeout` seconds of nothing."""
        self.arrived.clear()
        if self.messages:  # came while the reader answered flow control
            return True
        try:
            await asyncio.wait_for(self.arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True


class JetStreamLog:
    """Event log on the JetStream stream `stream` (created if missing) over client `nc`.

    `nc` is connected and closed by its owner; the log never closes it. `timeout` bounds
    each API request and the wait for each ack; `retry_for` how long an append keeps
    retrying before the log fails; `duplicate_window` is the stream's dedup window.
    `shared`: several writers take turns (cluster mode): `StaleWriter` fails only the
    append it met, and the writer `rebase`s before its next; `writer` names it in each
    record's `Imd-Writer` header.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        stream: str = "IMDISPATCH_EVENTS",
        subject: str = "imdispatch.events",
        replicas: int = 1,
        timeout: float = 5.0,
        retry_for: float = 30.0,
        duplicate_window: float = 120.0,
        max_inflight: int = 1000,
        shared: bool = False,
        writer: str | None = None,
        bounded: bool = False,
        purge: bool = False,
    ) -> None:
        if not 1 <= replicas <= 5:
            raise ValueError(f"replicas must be 1..5, got {replicas}")
        check_stream_name(stream)
        if not subject or any(c in subject for c in " *>\t"):
            raise ValueError(f"the subject must be a literal subject, got {subject!r}")
        self.nc = nc
        self.stream = stream
        self.subject = subject
        self.replicas = replicas
        self.timeout = timeout
        self.retry_for = retry_for
        self.duplicate_window = duplicate_window
        self.max_inflight = max_inflight
        self.shared = shared
        self.bounded = bounded  # may start after seq 1: purged up to a snapshot on purpose
        self.purge = purge  # a new stream allows purging (`[eventlog]` retention is set)
        self.first_seq = 1
        self._writer = {WRITER_HEADER: writer} if writer else {}
        self._writer_line = natswire.header_lines(self._writer)
        self._msg_id = f"{api.Header.MSG_ID.value}: {stream}:".encode()  # + seq:hash prefix
        self.behind = 0  # what `follow` last heard the stream held past what it yielded
        self.max_payload = records.MAX_PAYLOAD  # lowered to the server's limit at open
        self.last_seq = 0
        self.last_hash = records.GENESIS_HASH
        self._js = nc.jetstream(timeout=timeout)
        self._opened = False
        self._acked = 0  # the last seq the server acknowledged
        self._queue: deque[_Outgoing] = deque()
        self._next: tuple[list[_Outgoing], str, bytes] | None = None  # prepared, not sent
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()  # (last seq, future)
        self._wakeup: asyncio.Event | None = None
        self._sender: asyncio.Task | None = None
        self._ack_sub: Any = None
        self._ack_prefix = ""
        self._acks: dict[str, asyncio.Future] = {}
        self._tokens = 0
        self._batch_id = f"{os.urandom(8).hex()}-"  # + a count: unique per attempt
        self._failure: BaseException | None = None
        self._closing = False

    def stream_config(self) -> api.StreamConfig:
        """The config of a new stream: nothing is ever dropped (no limits, and DiscardNew
        so that a limit an operator adds refuses new events rather than deleting old ones);
        deleting or purging events is denied, as the log is an audit trail, unless the
        history is bounded (`purge`: the leader purges up to the oldest kept snapshot)."""
        return api.StreamConfig(
            name=self.stream,
            description="imdispatch routing events (hash-chained; stream seq = event seq)",
            subjects=[self.subject],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            discard=api.DiscardPolicy.NEW,
            max_msgs=-1,
            max_bytes=-1,
            max_age=0,
            duplicate_window=self.duplicate_window,
            deny_delete=True,
            deny_purge=not self.purge,
            allow_atomic=True,
        )

    # -- opening ----------------------------------------------------------------------

    async def open(self) -> Recovery:
        """Create or bind the stream and learn the tail: last seq and (re-derived) hash."""
        if self._opened:
            raise RuntimeError(f"event log stream {self.stream} is already open")
        recovery = Recovery()
        info = await self._ensure_stream(recovery)
        state = info.state
        last = state.last_seq or 0
        first = (state.first_seq or 1) if last else 1
        if first != 1 and self.bounded:  # purged up to a snapshot: rebuild checks the anchor
            self.first_seq = first
        elif first != 1:
            raise retention.unanchored(f"event log stream {self.stream}", first)
        if last and state.messages != last - first + 1:
            missing = await self._first_deleted()
            raise LogCorrupted(
                f"event log stream {self.stream} corrupted: {last - state.messages} of its "
                f"{last} events are missing (first missing: seq {missing})",
                segment=self.stream, offset=missing, seq=missing,
            )
        if last:
            raw = await self._js.get_msg(self.stream, last)
            self.last_hash = self.record(last, raw.headers, raw.data).hash
        self.last_seq = self._acked = recovery.last_seq = last
        self.max_payload = min(records.MAX_PAYLOAD, self.nc.max_payload - HEADER_ROOM)
        self._ack_prefix = self.nc.new_inbox()
        self._ack_sub = await self.nc.subscribe(f"{self._ack_prefix}.*", cb=self._on_ack)
        self._opened = True
        return recovery

    async def _ensure_stream(self, recovery: Recovery) -> api.StreamInfo:
        try:
            info = await self._js.stream_info(self.stream)
        except NotFoundError:
            try:
                info = await self._js.add_stream(self.stream_config())
                recovery.notes.append(
                    f"created JetStream stream {self.stream} ({self.subject}, file storage, "
                    f"{self.replicas} replica{'s' if self.replicas > 1 else ''})"
                )
                return await self._allow_batches(info, recovery)
            except APIError as exc:
                if exc.err_code == SUBJECTS_OVERLAP:
                    raise StreamConfigError(
                        f"cannot create event log stream {self.stream}: subject "
                        f"{self.subject} is already captured by another stream"
                    ) from exc
                if exc.err_code != STREAM_NAME_IN_USE:  # else another replica created it
                    raise StreamConfigError(
                        f"cannot create event log stream {self.stream} with {self.replicas} "
                        f"replicas: {exc.description} (error {exc.err_code})"
                    ) from exc
                info = await self._js.stream_info(self.stream)
        self._check_config(info.config, recovery)
        return await self._allow_batches(info, recovery)

    async def _allow_batches(self, info: api.StreamInfo, recovery: Recovery) -> api.StreamInfo:
        """Allow atomic batch publish (nats-server 2.12+), which appends need, on a
        stream made before they did."""
        config = info.config
        if config.allow_atomic:
            return info
        config.allow_atomic = True
        try:
            info = await self._js.update_stream(config)
        except APIError as exc:
            raise StreamConfigError(
                f"cannot allow atomic batches on stream {self.stream}: "
                f"{exc.description} (error {exc.err_code})"
            ) from exc
        if not info.config.allow_atomic:
            raise StreamConfigError(
                f"stream {self.stream}: the server ignored allow_atomic; the event log "
                "appends in atomic batches, which need nats-server 2.12 or newer"
            )
        recovery.notes.append(f"allowed atomic batch publish on stream {self.stream}")
        return info

    def _check_config(self, config: api.StreamConfig, recovery: Recovery) -> None:
        """Refuse a stream that is not this log or could lose events; note the harmless."""
        name = f"stream {self.stream}"
        problems = []
        if list(config.subjects or []) != [self.subject]:
            problems.append(f"its subjects are {config.subjects}, not [{self.subject!r}]")
        if config.retention not in (None, api.RetentionPolicy.LIMITS):
            problems.append(f"retention {config.retention} deletes events once consumed")
        if (config.max_age or 0) > 0:
            problems.append(f"max_age {config.max_age} s deletes old events")
        if config.discard != api.DiscardPolicy.NEW and any(
            (limit or -1) > 0
            for limit in (config.max_msgs, config.max_bytes, config.max_msgs_per_subject)
        ):
            problems.append("its limits with discard=old delete the oldest events")
        if config.mirror is not None or config.sealed:
            problems.append("it is a mirror or sealed, so it cannot be appended to")
        if problems:
            raise StreamConfigError(
                f"{name} exists but cannot hold this event log: {'; '.join(problems)} "
                "(use another stream name, or fix the stream)"
            )
        if config.num_replicas != self.replicas:
            recovery.notes.append(
                f"{name} has {config.num_replicas} replicas, not the {self.replicas} configured"
            )
        if config.storage != api.StorageType.FILE:
            recovery.notes.append(f"{name} uses {config.storage} storage: not durable")

    async def _first_deleted(self) -> int:
        """The first seq missing inside the stream (asks the server for deleted details)."""
        reply = await self.nc.request(
            f"$JS.API.STREAM.INFO.{self.stream}", b'{"deleted_details":true}', self.timeout
        )
        deleted = orjson.loads(reply.data).get("state", {}).get("deleted") or [0]
        return min(deleted)

    def record(
        self, seq: int, headers: dict[str, str] | None, data: bytes | None
    ) -> records.Record:
        """A message as a record, its hash re-derived; the format and header checked."""
        headers = headers or {}
        fmt, prev = headers.get(FORMAT_HEADER), headers.get(PREV_HEADER)
        # nats-py gives a value that is not ASCII as an email.header.Header
        return self._checked(seq, fmt if fmt is None else str(fmt),
                             prev if prev is None else str(prev), data)

    def _checked(self, seq: int, fmt: str | None, prev_hex: str | None,
                 data: bytes | None) -> records.Record:
        if fmt is None:
            raise LogCorrupted(
                f"event log stream {self.stream} corrupted: message {seq} is not an event "
                f"record (no {FORMAT_HEADER} header)",
                segment=self.stream, offset=seq, seq=seq,
            )
        if fmt != FORMAT:
            raise UnsupportedFormat(
                f"event log stream {self.stream}: message {seq} is in record format {fmt!r}; "
                f"this build reads format {FORMAT} (a newer dispatcher wrote it?)"
            )
        try:
            if prev_hex is None:
                raise ValueError("missing")
            prev = bytes.fromhex(prev_hex)
            if len(prev) != 32:
                raise ValueError(f"{len(prev)} bytes")
        except ValueError as exc:
            raise LogCorrupted(
                f"event log stream {self.stream} corrupted: message {seq} has no valid "
                f"{PREV_HEADER} header ({exc})",
                segment=self.stream, offset=seq, seq=seq,
            ) from None
        payload = data or b""
        return records.Record(seq, prev, payload, records.record_hash(seq, prev, payload))

    # -- appending --------------------------------------------------------------------

    def append(self, entries: Sequence[records.Entry]) -> asyncio.Future:
        """Queue encoded events (seq must continue the log); await the result for the acks.

        Framing happens now, so `last_seq`/`last_hash` are current when this returns.
        """
        if self._failure is not None or self._closing or not self._opened:
            raise LogClosed(
                f"event log stream {self.stream} is not open for appending"
                + (f": {self._failure}" if self._failure is not None else "")
            ) from self._failure
        loop = asyncio.get_running_loop()
        if self._sender is None:
            self._wakeup = asyncio.Event()
            self._sender = loop.create_task(self._send_loop())
        seq, prev = self.last_seq, self.last_hash
        outgoing, prev_hex, writer = [], prev.hex().encode(), self._writer_line
        for entry in entries:  # all checked before any is queued: a refusal changes nothing
            seq += 1
            if entry.seq != seq:
                raise ValueError(f"event seq {entry.seq} does not continue the log at {seq - 1}")
            records.check_size(entry, self.max_payload)
            payload = entry.payload
            digest = records.record_hash(seq, prev, payload)
            digest_hex = digest.hex().encode()
            outgoing.append(_Outgoing(seq, payload, b"%s%s\r\n%s%d:%s\r\n%s" % (
                _FORMAT_LINE, prev_hex, self._msg_id, seq, digest_hex[:32], writer), digest))
            prev, prev_hex = digest, digest_hex
        self._queue.extend(outgoing)
        self.last_seq, self.last_hash = seq, prev
        waiter = loop.create_future()
        if self._acked >= seq:
            waiter.set_result(None)
        else:
            self._waiters.append((seq, waiter))
            self._wakeup.set()
        return waiter

    async def _send_loop(self) -> None:
        while True:
            if self._next is None:
                if not self._queue:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._next = self._prepare()
            batch, self._next = self._next, None
            try:
                await self._send(*batch)
            except StaleWriter as exc:
                if not self.shared:
                    self._fail(exc)
                    return
                self._refuse(exc)  # another writer went first: this append only fails
            except BaseException as exc:  # whatever it is, the log stops here
                self._fail(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return

    def _batch_size(self) -> int:
        """How many queued messages the next batch takes: as many whole appends as fit
        (`max_inflight` messages, `BATCH_BYTES`), else the part of one that fits."""
        fits, size, first = 0, 0, self._queue[0].seq
        limit = min(len(self._queue), self.max_inflight, MAX_BATCH)
        while fits < limit and (not fits or size + len(self._queue[fits].data) <= BATCH_BYTES):
            size += len(self._queue[fits].data)
            fits += 1
        whole = 0
        for last, _ in self._waiters:  # in seq order; each append ends at its `last`
            if last - first + 1 > fits:
                break
            whole = last - first + 1
        return whole if whole > 0 else fits

    def _prepare(self) -> tuple[list[_Outgoing], str, bytes]:
        """The next batch off the queue, with its frames and the token of its ack."""
        batch = [self._queue.popleft() for _ in range(self._batch_size())]
        token = self._next_token()
        return batch, token, self._frames(batch, token)

    async def _send(self, batch: list[_Outgoing], token: str, frames: bytes) -> None:
        """Publish the batch as one atomic batch and wait for its one ack; on a retryable
        problem, send it again (as a new batch) until `retry_for` has passed. The next
        batch is prepared while this one is in flight (sent only after its ack)."""
        attempt, since = 0, time.monotonic()
        while True:
            try:
                problem: _Retry
                try:
                    await natswire.send(self.nc, frames)
                except nats.errors.ConnectionClosedError:
                    raise
                except Exception as exc:  # e.g. the reconnect buffer is full
                    problem = _Retry(f"publish failed: {exc!r}")
                else:
                    if self._next is None and self._queue:
                        self._next = self._prepare()
                    try:
                        await self._acknowledged(batch, self._acks[token],
                                                 time.monotonic() + self.timeout)
                        break
                    except _Retry as exc:
                        problem = exc
            finally:
                future = self._acks.pop(token, None)
                if future is not None and not future.done():
                    future.cancel()
            if time.monotonic() - since > self.retry_for:
                raise AppendFailed(
                    f"event log stream {self.stream}: event {batch[0].seq} not "
                    f"acknowledged within {self.retry_for} s: {problem}"
                )
            attempt += 1
            await asyncio.sleep(min(0.05 * 2**attempt, RESEND_EVERY))
            token = self._next_token()
            frames = self._frames(batch, token)
        self._acked = batch[-1].seq
        self._settle(self._acked)

    def _frames(self, batch: list[_Outgoing], token: str) -> bytes:
        """The batch's HPUB frames: its id and position on every message; the fence
        (expected stream and last seq) on the first; the commit and the reply on the
        last. JetStream refuses an expected last sequence past a batch's first message;
        the batch being all-or-nothing, the first one's fences the whole batch. A batch
        of one message goes as a plain message with the fence."""
        subject = self.subject.encode()
        batch_id = f"Nats-Batch-Id: {self._batch_id}{token}\r\nNats-Batch-Sequence: ".encode()
        fence = natswire.header_lines({
            api.Header.EXPECTED_STREAM.value: self.stream,
            api.Header.EXPECTED_LAST_SEQUENCE.value: str(batch[0].seq - 1),
        })
        hpub, last = natswire.hpub, len(batch)
        reply = f"{self._ack_prefix}.{token}".encode()
        if last == 1:  # atomic by itself; a batch would cost nats-server fsyncs at commit
            return hpub(subject, reply, fence + batch[0].lines, batch[0].data)
        frames = [hpub(subject, b"", b"%s%d\r\n%s" % (batch_id, n, item.lines), item.data)
                  for n, item in enumerate(batch[1:-1], 2)]
        commit = b"%s%d\r\nNats-Batch-Commit: 1\r\n%s" % (batch_id, last, batch[-1].lines)
        frames.insert(0, hpub(subject, b"", b"%s1\r\n%s%s" % (batch_id, fence, batch[0].lines),
                              batch[0].data))
        frames.append(hpub(subject, reply, commit, batch[-1].data))
        return b"".join(frames)

    def _next_token(self) -> str:
        self._tokens += 1
        token = str(self._tokens)
        self._acks[token] = asyncio.get_running_loop().create_future()
        return token

    async def _on_ack(self, msg: Msg) -> None:
        future = self._acks.get(msg.subject[len(self._ack_prefix) + 1:])
        if future is not None and not future.done():
            future.set_result(msg)

    async def _acknowledged(self, batch: list[_Outgoing], future: asyncio.Future,
                            deadline: float) -> None:
        """Return once the server stored `batch`; raise `_Retry` or the fatal error."""
        if not future.done():
            try:
                await asyncio.wait_for(future, max(deadline - time.monotonic(), 0))
            except TimeoutError:
                raise _Retry(f"no acknowledgement within {self.timeout} s") from None
        msg = future.result()
        if not msg.data:  # a status instead of an answer: 503 is "no responders"
            status = (msg.headers or {}).get(api.Header.STATUS)
            raise _Retry(f"no answer from JetStream (status {status})")
        reply = orjson.loads(msg.data)
        error = reply.get("error")
        first, last = batch[0], batch[-1]
        if error is None:
            if reply.get("seq") != last.seq:
                raise LogCorrupted(
                    f"event log stream {self.stream}: event {last.seq} was stored as "
                    f"message {reply.get('seq')}",
                    segment=self.stream, offset=reply.get("seq") or 0, seq=last.seq,
                )
            return
        code, text = error.get("err_code"), error.get("description", "")
        if code in WRONG_LAST_SEQUENCE or code == DUPLICATE_IN_BATCH or (
                "wrong last sequence" in text):
            # Its last record's hash seals the batch: if the stream holds that record,
            # it holds all of them, stored by an earlier attempt whose ack was lost.
            if await self._stored_hash(last.seq) == last.hash:
                return
            raise StaleWriter(
                f"event log stream {self.stream}: another writer appended since this one "
                f"last read the log ({text}; this writer expected to follow seq "
                f"{first.seq - 1}); reopen the journal to catch up before writing"
            )
        if code == INCOMPLETE_BATCH or error.get("code") == 503:  # e.g. leader election
            raise _Retry(f"{text} (error {code})")
        raise AppendFailed(
            f"event log stream {self.stream} refused events {first.seq}..{last.seq}: "
            f"{text} (error {code})"
        )

    async def _stored_or_unknown(self, seq: int) -> bool:
        """Does message `seq` exist? True also when the server cannot say right now: only
        a definite "not found" is evidence of a gap."""
        try:
            await self._js.get_msg(self.stream, seq)
        except NotFoundError:
            return False
        except Exception:
            return True
        return True

    async def _stored_hash(self, seq: int) -> bytes | None:
        try:
            raw = await self._js.get_msg(self.stream, seq)
        except NotFoundError:
            return None
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise _Retry(f"cannot check message {seq}: {exc!r}") from None
        try:
            return self.record(seq, raw.headers, raw.data).hash
        except EventLogError:
            return None

    def _settle(self, acked: int) -> None:
        while self._waiters and self._waiters[0][0] <= acked:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._refuse(exc if isinstance(exc, EventLogError) else LogClosed(
            f"event log stream {self.stream}: append failed: {exc!r}"
        ))

    def _refuse(self, error: BaseException) -> None:
        """Fail every append not yet acknowledged with `error`."""
        if self._next is not None:  # a prepared batch, built on what failed
            future = self._acks.pop(self._next[1], None)
            if future is not None:
                future.cancel()
            self._next = None
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters.clear()
        self._queue.clear()

    def rebase(self, seq: int, last_hash: bytes) -> None:
        """A shared log's writer appends next after record `seq` (hash `last_hash`): the
        end of the stream as its reader folded it. Only between appends."""
        if self._queue or self._waiters:
            raise RuntimeError("rebase with appends in flight")
        self.last_seq = self._acked = seq
        self.last_hash = last_hash

    async def sync(self) -> None:
        """Nothing to force: an acknowledged append is already stored by JetStream."""

    async def head(self) -> int:
        """The stream's last seq now (`LogUnavailable` if JetStream does not say)."""
        try:
            return (await self._js.stream_info(self.stream)).state.last_seq or 0
        except (nats.errors.Error, OSError) as exc:
            raise LogUnavailable(f"event log stream {self.stream}: cannot learn where it "
                                 f"ends: {exc!r}") from None

    # -- reading ----------------------------------------------------------------------

    async def read(self, after: int = 0) -> AsyncIterator[list[records.Record]]:
        """Verified records after `after`, in batches (what arrived), up to `last_seq`
        when reading began (the stream's last message if this log was not opened, or is
        shared: others append). Any gap in the seqs or break in the hash chain is
        corruption.

        The messages come raw from a push consumer of this read's own (ack-less, in
        memory, flow-controlled) and are checked in bulk (`MessageScanner`). Messages lost
        in transit (a gap in its delivery count) or silence start another consumer from
        the next message wanted."""
        last = self.last_seq
        if not self._opened or self.shared:
            try:
                last = (await self._js.stream_info(self.stream)).state.last_seq or 0
            except NotFoundError:
                raise StreamConfigError(f"no event log stream {self.stream}") from None
        scanner, since = MessageScanner(after + 1), None
        while scanner.seq <= last:
            feed = _Feed(self.nc)
            raw = await natswire.RawSubscription(self.nc, self.nc.new_inbox(), feed.take).start()
            consumer = None
            try:
                consumer = await self._bulk_consumer(raw.subject, scanner.seq)
                if consumer is None:  # JetStream does not answer (restarting, electing)
                    since = since or time.monotonic()
                    await self._stalled(scanner.seq, last, since)
                    await asyncio.sleep(READ_RETRY)
                    continue
                scanner.delivered = 1
                while scanner.seq <= last:
                    if not feed.messages:
                        await feed.release()
                        if await feed.wait(self.timeout):
                            continue
                        since = since or time.monotonic() - self.timeout
                        await self._stalled(scanner.seq, last, since)
                        break  # the consumer may be gone with its server: another one
                    arrived, feed.messages = feed.messages, []
                    batch, lost = self._scanned(scanner, arrived, after, last)
                    if batch:
                        since = None
                        yield batch
                    if lost:
                        break
            finally:
                await raw.stop()
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        await self._js.delete_consumer(self.stream, consumer)

    def _scanned(self, scanner: Any, arrived: list, after: int,
                 last: int) -> tuple[list[records.Record], bool]:
        """The records in `arrived` (up to `last`) and whether one was lost in transit;
        raises on a gap in the stream's seqs or a break in the chain."""
        batch: list[records.Record] = []
        index = 0
        while True:
            index, why, seq = scanner.scan(arrived, index, last, batch)
            if why == records.SCANNED or why == records.LOST:
                return batch, why == records.LOST
            expected = scanner.seq
            if why == records.WRONG_SEQ:
                if expected == after + 1 and seq > expected:
                    raise retention.trimmed(f"event log stream {self.stream}", seq, expected)
                raise LogCorrupted(
                    f"event log stream {self.stream} corrupted: message {expected} "
                    f"missing (the next one is {seq})",
                    segment=self.stream, offset=expected, seq=expected,
                )
            if why == records.BROKEN_CHAIN:
                raise self._chain_broken(seq)
            _, block, data = arrived[index]  # UNUSUAL: the slow way, which names the fault
            record = self._checked(seq, *_record_headers(block), data)
            if scanner.prev is not None and record.prev_hash != scanner.prev:
                raise self._chain_broken(seq)
            batch.append(record)
            scanner.passed(record)
            index += 1

    def _chain_broken(self, seq: int) -> LogCorrupted:
        return LogCorrupted(
            f"event log stream {self.stream} corrupted: the hash chain breaks at seq {seq} "
            f"(its previous-hash is not record {seq - 1}'s hash)",
            segment=self.stream, offset=seq, seq=seq,
        )

    async def _bulk_consumer(self, subject: str, start: int) -> str | None:
        """A consumer delivering the stream from `start` to `subject` for one read; None
        when JetStream does not answer now."""
        try:
            return (await self._js.add_consumer(self.stream, api.ConsumerConfig(
                deliver_subject=subject, ack_policy=api.AckPolicy.NONE,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
                flow_control=True, idle_heartbeat=READ_HEARTBEAT, mem_storage=True,
                num_replicas=1, inactive_threshold=max(self.retry_for, READ_HEARTBEAT),
            ))).name
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                ServiceUnavailableError):
            return None

    async def _stalled(self, expected: int, last: int, since: float) -> None:
        """Message `expected` has not come since `since`: raise if appends failed, if the
        stream lacks it or if it did not come within `retry_for`; else return (wait more)."""
        if self._failure is not None:
            raise LogClosed(
                f"event log stream {self.stream}: appends failed, so message "
                f"{expected} was never stored: {self._failure}"
            ) from self._failure
        if not await self._stored_or_unknown(expected):
            raise LogCorrupted(
                f"event log stream {self.stream} corrupted: message {expected} missing "
                f"(nothing arrived within {self.timeout} s; the log should end at seq {last})",
                segment=self.stream, offset=expected, seq=expected,
            )
        if time.monotonic() - since >= self.retry_for:  # it exists (or cannot be asked about)
            raise LogUnavailable(
                f"event log stream {self.stream}: message {expected} exists but "
                f"was not delivered within {self.retry_for} s"
            )

    async def follow(self, after: int, idle: float = 1.0,
                     heartbeat: float = 1.0) -> AsyncIterator[list[records.Record]]:
        """Records after `after` as they are appended, forever, in batches of what
        arrived; an empty batch when nothing came for `idle` seconds (so the caller can
        look at its own clocks). Seqs are checked here, the chain by whoever folds them.
        `behind` is how many messages the stream held past the last one yielded, as the
        server said. `heartbeat`: the consumer's idle heartbeat; nats-py recreates it
        after two missed (its server died, say)."""
        sub, buffer, arrived, room = await self._consume(after, heartbeat)
        try:
            expected = after + 1
            while True:
                if not buffer:
                    arrived.clear()
                    try:
                        await asyncio.wait_for(arrived.wait(), idle)
                    except TimeoutError:
                        yield []
                    continue
                batch = []
                while buffer and len(batch) < READ_BATCH:
                    msg = buffer.popleft()
                    seq = msg.metadata.sequence.stream
                    if seq < expected:
                        continue  # delivered again by a recreated consumer
                    if seq != expected:
                        raise LogUnavailable(
                            f"event log stream {self.stream}: message {expected} was not "
                            f"delivered (the next one was {seq})")
                    batch.append(self.record(seq, msg.headers, msg.data))
                    expected += 1
                    self.behind = msg.metadata.num_pending
                room.set()
                if batch:
                    yield batch
        finally:
            await self._stop_consuming(sub, buffer, room)

    async def _consume(self, after: int, heartbeat: float | None = None
                       ) -> tuple[Any, deque[Msg], asyncio.Event, asyncio.Event]:
        """An ordered push consumer from `after + 1` feeding a bounded buffer."""
        buffer: deque[Msg] = deque()
        arrived, room = asyncio.Event(), asyncio.Event()

        async def deliver(msg: Msg) -> None:
            # A callback, not next_msg(): no task per message. Blocking here when the
            # buffer is full holds back flow control, so the server pauses delivery.
            while len(buffer) >= READ_BUFFER:
                room.clear()
                await room.wait()
            buffer.append(msg)
            arrived.set()

        sub = await self._js.subscribe(
            self.subject,
            stream=self.stream,
            cb=deliver,
            ordered_consumer=True,
            idle_heartbeat=heartbeat,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=api.ConsumerConfig(opt_start_seq=after + 1),
        )
        return sub, buffer, arrived, room

    @staticmethod
    async def _stop_consuming(sub: Any, buffer: deque, room: asyncio.Event) -> None:
        buffer.clear()
        room.set()  # a callback blocked on a full buffer must not outlive the read
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    # -- closing ----------------------------------------------------------------------

    @property
    def failure(self) -> BaseException | None:
        """Why appends stopped (`StaleWriter`, an unavailable JetStream, ...), if they did."""
        return self._failure

    async def close(self) -> None:
        """Wait until everything appended is acknowledged (or failed); keep `nc` open."""
        self._closing = True
        if self._sender is not None:
            self._wakeup.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._sender
        if self._ack_sub is not None:
            with contextlib.suppress(Exception):
                await self._ack_sub.unsubscribe()
            self._ack_sub = None
        if self._failure is not None:
            raise LogClosed(f"event log stream {self.stream}: append failed: {self._failure}")
