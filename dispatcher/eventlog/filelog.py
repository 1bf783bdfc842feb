"""The file event log: segment files in a directory, the embedded default backend.

One process writes (an advisory lock on `<dir>/LOCK` keeps a second one out); any number
may read. Appends are encoded at once, in order, then written by a background task in
groups: whatever arrived while the previous write was in flight goes out in one write
(group commit). The fsync policy says when data is forced to disk:

- `always`: every group is fsynced before its appends return: an append that returned
  survives a crash or power loss;
- `batch`: appends return once written; an fsync follows within `fsync_interval`;
- `never`: the OS flushes when it likes (fastest; a power cut may lose recent events).

Opening for writing recovers from a crash as Kafka and LevelDB do: a torn final record is
truncated and reported; damage followed by valid records is corruption and the log
refuses to open (naming segment, offset and seq) unless `salvage=True`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from dispatcher.domain import events as ev
from dispatcher.eventlog import records
from dispatcher.eventlog.base import Recovery
from dispatcher.eventlog.errors import LogClosed, LogCorrupted, LogLocked
from dispatcher.eventlog.segments import (
    SEGMENT_HEADER,
    Segment,
    TornTail,
    encode_header,
    list_segments,
    segment_name,
)

FSYNC_POLICIES = ("always", "batch", "never")
CLEAN_MARKER = "CLEAN"
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024


class FileLog:
    """Append-only event log in `path` (a directory, created if missing)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fsync: str = "batch",
        fsync_interval: float = 0.05,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        salvage: bool = False,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        if segment_bytes < 4096:
            raise ValueError(f"segment_bytes must be at least 4096, got {segment_bytes}")
        self.path = Path(path)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self.salvage = salvage
        self.last_seq = 0
        self.last_hash = records.GENESIS_HASH
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the active (last) segment, opened for appending
        self._size = 0  # logical size of the active segment, queued writes included
        self._queue: list[tuple[str, object]] = []  # ("data", bytes) | ("rotate", (seq, hash))
        self._waiters: list[asyncio.Future] = []
        self._wakeup: asyncio.Event | None = None
        self._writer: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._failure: BaseException | None = None
        self._closing = False
        self._dirty = False  # written but not yet fsynced
        self._last_sync = time.monotonic()

    # -- opening ----------------------------------------------------------------------

    async def open(self) -> Recovery:
        """Lock the log for writing and recover its tail (blocks briefly: start-up only)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            recovery = self._recover()
        except BaseException:
            self._unlock()
            raise
        self.last_seq = recovery.last_seq
        return recovery

    def _lock(self) -> None:
        fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LogLocked(
                f"event log {self.path} is open for writing by another process (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _recover(self) -> Recovery:
        recovery = Recovery()
        paths = list_segments(self.path)
        if paths and paths[-1].stat().st_size < SEGMENT_HEADER.size:
            # A crash while rotating: the new segment has no whole header, so no records.
            recovery.notes.append(
                f"removed {paths[-1].name}: {paths[-1].stat().st_size} bytes, "
                "an unfinished segment header"
            )
            paths.pop().unlink()
        if not paths:
            self._open_segment(1, records.GENESIS_HASH)
            self._size = SEGMENT_HEADER.size
            return recovery
        clean = self._take_clean_marker(paths[-1])
        if clean is not None:
            recovery.last_seq = self.last_seq = clean[0]
            self.last_hash = clean[1]
            self._fd = os.open(paths[-1], os.O_WRONLY | os.O_APPEND)
            self._size = paths[-1].stat().st_size
            return recovery
        segment = Segment.read(paths[-1])
        torn: list[TornTail] = []
        end = SEGMENT_HEADER.size
        seq, last_hash = segment.first_seq - 1, segment.prev_hash
        try:
            for batch in segment.batches(last=True, torn=torn):
                end += sum(records.HEADER.size + len(record.payload) for record in batch)
                seq, last_hash = batch[-1].seq, batch[-1].hash
        except LogCorrupted as exc:
            if not self.salvage:
                raise
            recovery.salvaged = exc  # the scan got as far as the good prefix: keep that
        if torn:
            recovery.torn = torn[0]
        if end < len(segment.data):
            recovery.dropped_bytes = len(segment.data) - end
            with open(segment.path, "r+b") as handle:
                handle.truncate(end)
                os.fsync(handle.fileno())
        recovery.last_seq = seq
        self.last_seq, self.last_hash = seq, last_hash
        self._fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
        self._size = end
        return recovery

    def _take_clean_marker(self, last_segment: Path) -> tuple[int, bytes] | None:
        """(last seq, last hash) if the log was closed cleanly and not touched since.

        Like Kafka's clean-shutdown file: a clean close leaves a marker naming the last
        segment's size, seq and hash, so the next open can skip the recovery scan. The
        marker is removed at once, so a crash from here on is recovered by a scan.
        """
        marker = self.path / CLEAN_MARKER
        try:
            raw = orjson.loads(marker.read_bytes())
        except (OSError, ValueError):
            return None
        finally:
            if marker.exists():
                marker.unlink()
                _fsync_directory(self.path)
        try:
            stat = last_segment.stat()
            if (raw["segment"], raw["size"], raw["mtime_ns"]) == (
                last_segment.name, stat.st_size, stat.st_mtime_ns
            ):
                return raw["last_seq"], bytes.fromhex(raw["last_hash"])
        except (KeyError, TypeError, ValueError):
            pass
        return None

    def _open_segment(self, first_seq: int, prev_hash: bytes) -> None:
        """Create the next segment (writer thread, or start-up) and make it the active one."""
        if self._fd is not None:
            if self.fsync != "never":
                os.fsync(self._fd)
            os.close(self._fd)
        path = self.path / segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, encode_header(first_seq, prev_hash))
        if self.fsync != "never":
            os.fsync(fd)
            _fsync_directory(self.path)
        self._fd = fd

    # -- appending --------------------------------------------------------------------

    def append(self, events: Sequence[ev.Event]) -> asyncio.Future:
        """Queue stamped events (seq must continue the log); await the result for durability.

        Encoding happens now, so `last_seq`/`last_hash` are current when this returns; the
        future completes once the events are written (and fsynced, with `always`).
        """
        if self._failure is not None or self._closing or self._fd is None:
            raise LogClosed(f"event log {self.path} is not open for appending") from self._failure
        loop = asyncio.get_running_loop()
        if self._writer is None:
            self._wakeup = asyncio.Event()
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="eventlog")
            self._writer = loop.create_task(self._write_loop())
        seq, prev = self.last_seq, self.last_hash
        chunk = bytearray()
        for event in events:
            seq += 1
            if event.seq != seq:
                raise ValueError(f"event seq {event.seq} does not continue the log at {seq - 1}")
            data, digest = records.encode(seq, prev, orjson.dumps(event))
            if self._size + len(chunk) + len(data) > self.segment_bytes and (
                self._size + len(chunk) > SEGMENT_HEADER.size
            ):
                self._queue_data(chunk)
                chunk = bytearray()
                self._queue.append(("rotate", (seq, prev)))
                self._size = SEGMENT_HEADER.size
            chunk += data
            prev = digest
        self._queue_data(chunk)
        self.last_seq, self.last_hash = seq, prev
        waiter = loop.create_future()
        self._waiters.append(waiter)
        self._wakeup.set()
        return waiter

    def _queue_data(self, chunk: bytearray) -> None:
        if chunk:
            self._queue.append(("data", bytes(chunk)))
            self._size += len(chunk)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    break
                await self._idle()
                continue
            batch, waiters = self._queue, self._waiters
            self._queue, self._waiters = [], []
            sync = self.fsync == "always" or (
                self.fsync == "batch"
                and time.monotonic() - self._last_sync >= self.fsync_interval
            )
            try:
                await loop.run_in_executor(self._executor, self._write, batch, sync)
            except BaseException as exc:  # an I/O error: nothing after this is durable
                self._fail(exc, waiters)
                return
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if self._dirty and self.fsync != "never":
            await loop.run_in_executor(self._executor, self._sync)

    async def _idle(self) -> None:
        """Wait for appends; with `batch`, fsync what is still unsynced when it is due."""
        self._wakeup.clear()
        if not (self._dirty and self.fsync == "batch"):
            await self._wakeup.wait()
            return
        due = self._last_sync + self.fsync_interval - time.monotonic()
        try:
            await asyncio.wait_for(self._wakeup.wait(), max(due, 0))
        except TimeoutError:
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._sync)
            except OSError as exc:
                self._fail(exc, [])

    def _write(self, batch: list[tuple[str, object]], sync: bool) -> None:
        """Writer thread: the queued operations in order, then an fsync if asked."""
        for kind, item in batch:
            if kind == "rotate":
                self._open_segment(*item)  # type: ignore[misc]
            else:
                os.write(self._fd, item)  # type: ignore[arg-type]
                self._dirty = True
        if sync:
            self._sync()

    def _sync(self) -> None:
        if self._dirty:
            os.fdatasync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def _fail(self, exc: BaseException, waiters: list[asyncio.Future]) -> None:
        self._failure = exc
        error = LogClosed(f"event log {self.path}: write failed: {exc}")
        for waiter in [*waiters, *self._waiters]:
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters, self._queue = [], []

    async def read(self, after: int = 0) -> AsyncIterator[list[records.Record]]:
        """Verified records after `after`, in batches (one await per batch, not per record)."""
        for batch in LogReader(self.path).batches(after):
            yield batch

    @property
    def failure(self) -> BaseException | None:
        """The I/O error that stopped appends, if any: the log is then behind the state."""
        return self._failure

    async def close(self) -> None:
        """Write and (unless `never`) fsync everything queued, then release the log."""
        self._closing = True
        if self._writer is not None:
            self._wakeup.set()
            with contextlib.suppress(Exception):
                await self._writer
            self._executor.shutdown(wait=True)
        if self._fd is not None:
            if self._failure is None and self.fsync != "never":
                self._write_clean_marker()
            os.close(self._fd)
            self._fd = None
        self._unlock()
        if self._failure is not None:
            raise LogClosed(f"event log {self.path}: write failed: {self._failure}")


    def _write_clean_marker(self) -> None:
        last_segment = list_segments(self.path)[-1]
        marker = self.path / CLEAN_MARKER
        stat = os.fstat(self._fd)
        marker.with_suffix(".tmp").write_bytes(orjson.dumps({
            "segment": last_segment.name,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash.hex(),
        }))
        os.replace(marker.with_suffix(".tmp"), marker)
        _fsync_directory(self.path)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading (no lock: any number of readers, also while a writer appends) --------------


class LogReader:
    """Verified records of a log directory, in order, from any seq on.

    Every record's checksum, sequence and hash chain are checked; damage raises
    `LogCorrupted`. A torn tail (the unfinished write of a crash, or an append in
    progress) ends the records and is kept in `torn`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no event log at {self.path}")
        self.torn: TornTail | None = None

    def records(self, after: int = 0) -> Iterator[records.Record]:
        for batch in self.batches(after):
            yield from batch

    def batches(self, after: int = 0) -> Iterator[list[records.Record]]:
        """The records after `after` in lists (the scanner's batches: less overhead)."""
        paths = list_segments(self.path)
        start = 0
        for index, path in enumerate(paths):  # the segment that holds seq `after + 1`
            if int(path.name[:20]) <= after + 1:
                start = index
        expected_seq, expected_hash = None, None
        for index in range(start, len(paths)):
            segment = Segment.read(paths[index])
            if expected_seq is not None and (
                segment.first_seq != expected_seq or segment.prev_hash != expected_hash
            ):
                raise LogCorrupted(
                    f"event log corrupted: {segment.path.name} does not continue "
                    f"{paths[index - 1].name} (expected first seq {expected_seq})",
                    segment=segment.path.name, offset=0, seq=segment.first_seq,
                )
            expected_seq, expected_hash = segment.first_seq, segment.prev_hash
            torn: list[TornTail] = []
            for batch in segment.batches(last=index == len(paths) - 1, after=after, torn=torn):
                expected_seq, expected_hash = batch[-1].seq + 1, batch[-1].hash
                yield batch
            if torn:
                self.torn = torn[0]

    def events(self, after: int = 0) -> Iterator[ev.Event]:
        for record in self.records(after):
            yield record.event()
