"""The file event log: segment files in a directory, the embedded default backend.

One process writes (an advisory lock on `<dir>/LOCK` keeps a second one out); any number
may read. The writer checks, before every write and every second, that the directory, lock
file and segment it holds open are still the ones at their paths: a log removed, moved or
replaced under it fails (`LogReplaced`) instead of taking writes that nobody will find.

Appends are framed at once, in order, then written by a background task in
groups: whatever arrived while the previous write was in flight goes out in one write
(group commit). The fsync policy says when data is forced to disk:

- `always`: every group is fsynced before its appends return: an append that returned
  survives a crash or power loss;
- `batch`: appends return once written; an fsync follows within `fsync_interval`;
- `never`: the OS flushes when it likes (fastest; a power cut may lose recent events).

Opening for writing recovers from a crash as Kafka and LevelDB do: a torn final record is
truncated and reported; damage followed by valid records is corruption and the log
refuses to open (naming segment, offset and seq) unless `salvage=True`.

Bounded history (`retention`): at open and after each rotation, whole segments before the
oldest kept snapshot go once a limit lets them (in a thread of their own, never the
writer's). The log then starts after seq 1, anchored by a snapshot; one that starts later
with no snapshot at its first seq - 1 or after lost records, and is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from dispatcher.domain import events as ev
from dispatcher.eventlog import records
from dispatcher.eventlog import retention as retain
from dispatcher.eventlog.base import Recovery
from dispatcher.eventlog.errors import (
    EventLogError,
    LogClosed,
    LogCorrupted,
    LogLocked,
    LogMissing,
    LogReplaced,
)
from dispatcher.eventlog.files import (
    NotRegularFile,
    open_regular,
    read_regular,
    replace_atomically,
    require_regular,
)
from dispatcher.eventlog.segments import (
    SEGMENT_HEADER,
    Segment,
    TornTail,
    encode_header,
    list_segments,
    scan_batch,
    segment_name,
)
from dispatcher.eventlog.snapshots import SNAPSHOT_DIR, SnapshotStore, snapshot_name

log = logging.getLogger("imdispatch.eventlog")
FSYNC_POLICIES = ("always", "batch", "never")
CLEAN_MARKER = "CLEAN"
LOCK_FILE = "LOCK"
CHECK_INTERVAL = 1.0  # seconds between checks that an idle log is still in place
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
        create: bool = True,
        run_id: str | None = None,
        retention: retain.Retention | None = None,
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
        self.create = create  # False: the log must exist (never make a new one in its place)
        self.run_id = run_id  # recorded in LOCK: the `imdispatch serve` this writer belongs to
        self.retention = retention or retain.Retention()  # default: every event kept
        self.max_payload = records.MAX_PAYLOAD
        self.last_seq = 0
        self.last_hash = records.GENESIS_HASH
        self._dir_fd: int | None = None  # the directory, held open to notice it is replaced
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the active (last) segment, opened for appending
        self._segment: Path | None = None  # its path
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
        self.appended = 0  # events appended since open
        self._rotated = False  # a segment was sealed since retention last looked
        self._retaining: asyncio.Future | None = None  # retention at work (its own thread)
        self.on_sync: Callable[[float], None] | None = None  # seconds each fsync took

    # -- opening ----------------------------------------------------------------------

    async def open(self) -> Recovery:
        """Lock the log for writing and recover its tail (blocks briefly: start-up only).

        With `create=False` the log must be there already (`LogMissing` if its directory,
        lock file or segments are gone): a worker taking over from a dead writer must not
        start a new, empty log where the old one vanished.
        """
        if self.create:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise LogMissing(f"no event log at {self.path}") from None
        try:
            self._lock()
            if not self.create and not list_segments(self.path):
                raise LogMissing(f"event log {self.path} has no segment files any more")
            recovery = self._recover()
            self._drop_clean_marker()
            recovery.notes += self._retain()
        except BaseException:
            self._release()
            raise
        self.last_seq = recovery.last_seq
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="eventlog")
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        return recovery

    def check(self) -> None:
        """Raise what `open()` would (`LogLocked`, `LogCorrupted`, `UnsupportedFormat`,
        `OSError`: a LOCK that is a directory, a segment that cannot be opened for
        writing), opening as the writer will, without touching a record (no torn tail is
        cut: the writer does that and says so), and close again: the supervisor's check
        before it starts the workers that open the log."""
        if self.create:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise LogMissing(f"no event log at {self.path}") from None
        try:
            self._lock()
            self._recover(dry=True)
        finally:
            self._release()

    def _lock(self) -> None:
        flags = os.O_RDWR | (os.O_CREAT if self.create else 0)
        try:
            fd = open_regular(LOCK_FILE, flags, dir_fd=self._dir_fd,
                              shown=self.path / LOCK_FILE)
        except FileNotFoundError:
            raise LogMissing(f"event log {self.path} has no {LOCK_FILE} file any more") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, run_id = _holder(fd)
            os.close(fd)
            raise LogLocked(
                f"event log {self.path} is open for writing by another process (pid {pid})",
                pid=pid, run_id=run_id,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{self.run_id or ''}\n".encode(), 0)
        self._lock_fd = fd

    def _release(self) -> None:
        """Close every file the writer holds; closing the lock file releases the lock."""
        for name in ("_fd", "_lock_fd", "_dir_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def _check_in_place(self) -> None:
        """Raise `LogReplaced` unless the directory, lock file and segment this writer
        holds open are still the ones at their paths. (The open descriptors keep those
        inodes alive, so a recreated file can never reuse one and pass for the old.)"""
        held_files = ((self._dir_fd, self.path), (self._lock_fd, self.path / LOCK_FILE),
                      (self._fd, self._segment))
        for fd, path in held_files:
            if fd is None or path is None:
                continue
            held = os.fstat(fd)
            try:
                current = os.stat(path)
            except OSError:
                current = None
            if held.st_nlink == 0 or current is None or (
                    (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino)):
                raise LogReplaced(
                    f"{path} is no longer the file this process writes (removed, moved or "
                    "replaced while the dispatcher ran): later events would be lost"
                )

    def _recover(self, *, dry: bool = False) -> Recovery:
        """Find the end of the log and open its last segment for appending. `dry`: only
        see that it can be done (no file removed, truncated or created).

        Everything that could prove records lost is consulted before anything is removed
        or cut: the CLEAN marker (the size the last segment had at a clean stop) and the
        snapshots (each written once the log held its seq). Such a loss is corruption,
        refused unless salvaging, never taken for what a crash leaves."""
        recovery = Recovery()
        paths = list_segments(self.path)
        for path in paths:
            require_regular(path)
        marker = self._read_clean_marker()
        if not self.salvage:
            self._check_vouched(marker, paths)
        self._check_anchored(paths)
        unfinished = None
        if paths and paths[-1].stat().st_size < SEGMENT_HEADER.size:
            # A crash while rotating: the new segment has no whole header, so no records.
            unfinished = paths.pop()
            recovery.notes.append(
                f"removed {unfinished.name}: {unfinished.stat().st_size} bytes, "
                "an unfinished segment header"
            )
        if not paths and unfinished is not None and int(unfinished.name[:20]) > 1:
            raise LogCorrupted(
                f"event log {self.path} corrupted: its only segment {unfinished.name} has no "
                "whole header (a crash while rotating), and the records before it are gone "
                "(retention): the log cannot go on from there", segment=unfinished.name,
                offset=0, seq=int(unfinished.name[:20]))
        if not paths:
            self._check_snapshots(0)
            if not dry:
                self._remove(unfinished)
                self._open_segment(1, records.GENESIS_HASH)
                self._size = SEGMENT_HEADER.size
            return recovery
        last = paths[-1]
        stat = last.stat()
        if marker is not None and marker.get("segment") == last.name and (
            marker.get("size"), marker.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            # Closed cleanly and untouched since: no scan needed (as Kafka's clean-shutdown
            # file). Records are verified anyway whenever they are read.
            self._check_snapshots(marker["last_seq"])
            if not dry:
                self._remove(unfinished)
            recovery.last_seq = self.last_seq = marker["last_seq"]
            self.last_hash = bytes.fromhex(marker["last_hash"])
            self._open_active(last, stat.st_size)
            return recovery
        # The marker vouches the segment was whole at that size: damage within it cannot
        # be an unfinished write, only corruption.
        complete = marker is not None and marker.get("segment") == last.name and (
            marker.get("size") == stat.st_size)
        try:
            segment = Segment.read(last)
        except LogCorrupted as exc:
            if not self.salvage or len(paths) == 1:
                raise
            recovery.salvaged, recovery.dropped_bytes = exc, stat.st_size
            recovery.notes.append(f"removed {last.name}: its header is damaged")
            if dry:
                return recovery
            self._remove(unfinished)
            last.unlink()
            return self._recover_after_salvage(recovery)
        torn: list[TornTail] = []
        end = SEGMENT_HEADER.size
        seq, last_hash = segment.first_seq - 1, segment.prev_hash
        try:
            for batch in segment.batches(last=not complete, torn=torn):
                end += sum(records.HEADER.size + len(record.payload) for record in batch)
                seq, last_hash = batch[-1].seq, batch[-1].hash
        except LogCorrupted as exc:
            if not self.salvage:
                raise
            recovery.salvaged = exc  # the scan got as far as the good prefix: keep that
        if torn:
            recovery.torn = torn[0]
        self._check_snapshots(seq)
        if not dry:
            self._remove(unfinished)
            if end < len(segment.data):
                recovery.dropped_bytes = len(segment.data) - end
                with open(open_regular(segment.path, os.O_RDWR), "r+b") as handle:
                    handle.truncate(end)
                    os.fsync(handle.fileno())
        recovery.last_seq = seq
        self.last_seq, self.last_hash = seq, last_hash
        self._open_active(segment.path, end)
        return recovery

    def _check_vouched(self, marker: dict | None, paths: list[Path]) -> None:
        """A CLEAN marker says in which segment, at what size, the log ended at a clean
        stop, and nothing was written since: that segment gone or shorter is lost records
        (a truncated file, a restore gone wrong), not a crash while rotating or writing."""
        if marker is None or not isinstance(marker.get("size"), int):
            return
        name = marker.get("segment")
        vouched = self.path / str(name)
        size = vouched.stat().st_size if vouched in paths else None
        if size is not None and size >= marker["size"]:
            return
        now = "is gone" if size is None else f"is {size} bytes"
        raise LogCorrupted(
            f"event log corrupted: {vouched} {now}, but the clean stop that left "
            f"{self.path / CLEAN_MARKER} recorded {marker['size']} bytes (records up to seq "
            f"{marker.get('last_seq')}): records were lost",
            segment=str(name), offset=size or 0, seq=0,
        )

    def _check_anchored(self, paths: list[Path]) -> None:
        """A log whose first segment starts after seq 1 (retention dropped the ones
        before) must be anchored by a snapshot that checks out at that seq - 1 or later;
        else records were lost (`HistoryTrimmed`, naming the missing range)."""
        start = int(paths[0].name[:20]) if paths else 1
        if start > 1 and self._anchor(start) is None:
            raise retain.unanchored(f"event log {self.path}", start)

    def _anchor(self, start: int) -> int | None:
        """The seq of the newest snapshot that checks out at `start - 1` or later."""
        store = SnapshotStore(self.path / SNAPSHOT_DIR)
        for seq in reversed(store.seqs()):
            if seq >= start - 1 and _sound(store, seq):
                return seq
        return None

    def _retain(self) -> list[str]:
        """Drop what `retention` lets go: sealed segments before the oldest kept snapshot,
        oldest first (the directory fsynced after each, so a crash never leaves a gap),
        and snapshots beyond `keep_snapshots`; one line for what was dropped. Never the
        segment being written. Any thread but the writer's (it only reads `_segment`)."""
        if not self.retention.bounded or self._segment is None:
            return []
        paths = list_segments(self.path)
        firsts = [int(path.name[:20]) for path in paths]
        sealed = [path for path in paths if path.name < self._segment.name]
        units = [retain.Unit(first, following - 1, path.stat().st_mtime)
                 for path, first, following in zip(sealed, firsts, firsts[1:], strict=False)]
        store = SnapshotStore(self.path / SNAPSHOT_DIR, self.retention.keep_snapshots)
        plan = retain.plan(self.retention, start=firsts[0], last_seq=self.last_seq,
                           units=units, snapshots=store.seqs(),
                           sound=lambda seq: _sound(store, seq), now=time.time())
        for path in paths[:plan.units]:
            os.unlink(path.name, dir_fd=self._dir_fd)
            os.fsync(self._dir_fd)
        for seq in plan.snapshots:
            (store.directory / snapshot_name(seq)).unlink(missing_ok=True)
        if not plan.units:
            return []
        return [f"retention dropped {plan.units} segment(s), seq {firsts[0]}.."
                f"{plan.start - 1}: history starts at seq {plan.start}, anchored by "
                f"{snapshot_name(plan.anchor)}"]

    def _after_rotation(self) -> None:
        """Start retention in a thread of its own once a segment was sealed (one at a
        time: the next rotation catches up with what a running one missed)."""
        self._rotated = False
        if not self.retention.bounded or (
                self._retaining is not None and not self._retaining.done()):
            return
        self._retaining = asyncio.get_running_loop().run_in_executor(None, self._retain)
        self._retaining.add_done_callback(_said)

    def _check_snapshots(self, last_seq: int) -> None:
        """Refuse a snapshot file that is not a regular file, and a sound snapshot of a
        seq past the log's end: it was written once the log held that seq, so records
        were lost. Only salvaging goes on (and `recover --salvage` then removes it)."""
        store = SnapshotStore(self.path / SNAPSHOT_DIR)
        store.require_regular()
        if self.salvage:
            return
        for snapshot in store.ahead_of(last_seq):
            raise LogCorrupted(
                f"event log corrupted: it ends at seq {last_seq}, but snapshot "
                f"{store.directory / snapshot_name(snapshot.seq)} holds the state at seq "
                f"{snapshot.seq}: records {last_seq + 1}..{snapshot.seq} were lost",
                segment="", offset=0, seq=last_seq + 1,
            )

    def _remove(self, unfinished: Path | None) -> None:
        """Remove a segment with an unfinished header (a crash while rotating)."""
        if unfinished is not None:
            unfinished.unlink()

    def _open_active(self, path: Path, size: int) -> None:
        self._fd, self._segment = open_regular(path, os.O_WRONLY | os.O_APPEND), path
        self._size = size

    def _recover_after_salvage(self, recovery: Recovery) -> Recovery:
        """Recover again now that a damaged last segment is gone, keeping the report."""
        again = self._recover()
        again.salvaged = again.salvaged or recovery.salvaged
        again.dropped_bytes += recovery.dropped_bytes
        again.notes[:0] = recovery.notes
        return again

    def _read_clean_marker(self) -> dict | None:
        """The clean-shutdown marker. It stays until recovery succeeded: damage that it
        proves is corruption stays refused at every start, never taken for a torn tail."""
        try:
            raw = orjson.loads(read_regular(self.path / CLEAN_MARKER))
        except (OSError, ValueError):  # none, or unreadable: the scan decides
            raw = None
        return raw if isinstance(raw, dict) else None

    def _drop_clean_marker(self) -> None:
        """Once the log is recovered and about to be written: a crash from here on gets
        a full scan."""
        marker = self.path / CLEAN_MARKER
        if marker.exists():
            marker.unlink()
            os.fsync(self._dir_fd)

    def _open_segment(self, first_seq: int, prev_hash: bytes) -> None:
        """Create the next segment (writer thread, or start-up) and make it the active one.

        The old segment is fsynced first (unless `never`), so a crash can leave a torn
        tail only in the last segment; it is closed only once the new one exists, so a
        failure here leaves the log on the old one, still open.
        """
        if self._fd is not None and self.fsync != "never":
            os.fsync(self._fd)
        name = segment_name(first_seq)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
        fd = os.open(name, flags, 0o644, dir_fd=self._dir_fd)
        try:
            _write_all(fd, encode_header(first_seq, prev_hash))
            if self.fsync != "never":
                os.fsync(fd)
                os.fsync(self._dir_fd)
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=self._dir_fd)
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._segment = fd, self.path / name

    # -- appending --------------------------------------------------------------------

    def append(self, entries: Sequence[records.Entry]) -> asyncio.Future:
        """Queue encoded events (seq must continue the log); await the result for durability.

        Framing happens now, so `last_seq`/`last_hash` are current when this returns; the
        future completes once the events are written (and fsynced, with `always`).
        """
        if self._failure is not None or self._closing or self._fd is None:
            raise LogClosed(f"event log {self.path} is not open for appending") from self._failure
        loop = asyncio.get_running_loop()
        # Check everything before touching the log's state: a refused entry changes nothing.
        seq, prev, size = self.last_seq, self.last_hash, self._size
        operations: list[tuple[str, object]] = []
        chunk = bytearray()
        for entry in entries:
            seq += 1
            if entry.seq != seq:
                raise ValueError(f"event seq {entry.seq} does not continue the log at {seq - 1}")
            records.check_size(entry, self.max_payload)
            data, digest = records.encode(seq, prev, entry.payload)
            if size + len(data) > self.segment_bytes and size > SEGMENT_HEADER.size:
                if chunk:
                    operations.append(("data", bytes(chunk)))
                    chunk = bytearray()
                operations.append(("rotate", (seq, prev)))
                size = SEGMENT_HEADER.size
            chunk += data
            size += len(data)
            prev = digest
        if chunk:
            operations.append(("data", bytes(chunk)))
        self._queue += operations
        self.last_seq, self.last_hash, self._size = seq, prev, size
        self.appended += len(entries)
        waiter = loop.create_future()
        self._waiters.append(waiter)
        self._wakeup.set()
        return waiter

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._failure is None:
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
            if self._rotated:
                self._after_rotation()
        if self._failure is None and self._dirty and self.fsync != "never":
            try:
                await loop.run_in_executor(self._executor, self._sync)
            except OSError as exc:
                self._fail(exc, [])

    async def sync(self) -> None:
        """Force what was written so far to disk now (whatever the fsync policy)."""
        if self._writer is not None and self._failure is None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._force_sync)

    def _force_sync(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)

    async def _idle(self) -> None:
        """Wait for appends; meanwhile check every `CHECK_INTERVAL` that the log is still
        in place and, with `batch`, fsync what is still unsynced when it is due."""
        self._wakeup.clear()
        wait = CHECK_INTERVAL
        if self._dirty and self.fsync == "batch":
            wait = max(self._last_sync + self.fsync_interval - time.monotonic(), 0)
        try:
            async with asyncio.timeout(wait):  # not wait_for: it can lose a cancel (3.11)
                await self._wakeup.wait()
        except TimeoutError:
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._tend)
            except (OSError, EventLogError) as exc:
                self._fail(exc, [])

    def _tend(self) -> None:
        """Writer thread, while idle: the check, and the fsync `batch` owes."""
        self._check_in_place()
        if self.fsync == "batch":
            self._sync()

    def _write(self, batch: list[tuple[str, object]], sync: bool) -> None:
        """Writer thread: the queued operations in order, one write per segment, then an
        fsync if asked. Nothing is written to a log that is no longer in place."""
        self._check_in_place()
        pending = bytearray()
        for kind, item in batch:
            if kind == "rotate":
                self._flush(pending)
                self._open_segment(*item)  # type: ignore[misc]
                self._rotated = True
            else:
                pending += item  # type: ignore[operator]
        self._flush(pending)
        if sync:
            self._sync()

    def _flush(self, data: bytearray) -> None:
        if data:
            self._dirty = True
            _write_all(self._fd, data)
            data.clear()

    def _sync(self) -> None:
        if self._dirty:
            started = time.perf_counter()
            os.fdatasync(self._fd)
            self._dirty = False
            if self.on_sync is not None:
                self.on_sync(time.perf_counter() - started)
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
        reader = LogReader(self.path)
        async for batch in reader.read(after):
            yield batch
        torn = reader.torn
        if torn is not None and torn.seq <= self.last_seq:  # the writer knows it was whole
            raise LogCorrupted(
                f"event log corrupted in {torn.segment} at offset {torn.offset} "
                f"(seq {torn.seq}): {torn.problem}",
                segment=torn.segment.name, offset=torn.offset, seq=torn.seq,
            )

    @property
    def failure(self) -> BaseException | None:
        """The I/O error that stopped appends, if any: the log is then behind the state."""
        return self._failure

    async def close(self) -> None:
        """Write and (unless `never`) fsync everything queued, then release the log."""
        self._closing = True
        if self._writer is not None:
            self._wakeup.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._writer
            self._executor.shutdown(wait=True)
        if self._retaining is not None:
            with contextlib.suppress(Exception):  # said by `_said`
                await self._retaining
        if self._fd is not None and self._failure is None:
            try:
                self._check_in_place()  # a marker in a directory that replaced ours would lie
            except LogReplaced as exc:
                self._failure = exc
            else:
                if self.fsync != "never":
                    self._write_clean_marker()
        self._release()
        if self._failure is not None:
            raise LogClosed(f"event log {self.path}: write failed: {self._failure}")

    def _write_clean_marker(self) -> None:
        stat = os.fstat(self._fd)
        replace_atomically(self.path / CLEAN_MARKER, orjson.dumps({
            "segment": self._segment.name,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash.hex(),
        }), fsync=True)
        os.fsync(self._dir_fd)


def _sound(store: SnapshotStore, seq: int) -> bool:
    """Whether the snapshot at `seq` checks out (read whole: asked for few)."""
    try:
        store.load(seq)
    except (OSError, ValueError, NotRegularFile):
        return False
    return True


def _said(done: asyncio.Future) -> None:
    """Log what a retention run did, or why it failed (the log goes on: it only keeps
    more than it needs to)."""
    if done.cancelled():
        return
    if done.exception() is not None:
        log.warning("event log retention failed: %r", done.exception())
        return
    for line in done.result():
        log.info("event log: %s", line)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    """os.write until everything is written: a short write (a disk filling up) must not
    pass for a whole one; the error that follows it fails the log."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _holder(fd: int) -> tuple[str, str | None]:
    """(pid, run id) as the lock's holder recorded them in the lock file."""
    fields = os.pread(fd, 256, 0).decode(errors="replace").split()
    return (fields[0] if fields else "unknown"), (fields[1] if len(fields) > 1 else None)


def writer_pid(path: str | os.PathLike) -> str | None:
    """The pid recorded by the process that has the log at `path` open for writing, or
    None if none has. (It tries the lock for an instant: a writer starting at that moment
    gets `LogLocked` once.)"""
    try:
        fd = open_regular(Path(path) / LOCK_FILE, os.O_RDONLY)
    except (FileNotFoundError, NotRegularFile):  # no writer could lock that
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)[0]
    finally:
        os.close(fd)
    return None


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
        if not paths:
            raise FileNotFoundError(f"{self.path} is not an event log: no segment files")
        if len(paths) > 1 and paths[-1].stat().st_size < SEGMENT_HEADER.size:
            paths.pop()  # a segment being created right now, or a crash while rotating
        start = 0
        for index, path in enumerate(paths):  # the segment that holds seq `after + 1`
            if int(path.name[:20]) <= after + 1:
                start = index
        first = int(paths[start].name[:20])
        if first > after + 1:  # dropped by retention (a snapshot anchors it), or lost
            raise retain.trimmed(f"event log {self.path}", first, after + 1, paths[start].name)
        expected_seq = expected_hash = None
        if first == 1:  # the log's first record must link to the genesis hash
            expected_seq, expected_hash = 1, records.GENESIS_HASH
        for index in range(start, len(paths)):
            try:
                segment = Segment.read(paths[index])
            except FileNotFoundError:  # retention dropped it meanwhile: read from later on
                raise retain.HistoryTrimmed(
                    f"event log {self.path}: {paths[index].name} was removed while it was "
                    "read (retention dropped it)", start=expected_seq or after + 1,
                    segment=paths[index].name) from None
            if expected_seq is not None and (
                segment.first_seq != expected_seq or segment.prev_hash != expected_hash
            ):
                after_what = f"{paths[index - 1].name}" if index else "the start of the log"
                raise LogCorrupted(
                    f"event log corrupted: {segment.path.name} does not continue "
                    f"{after_what} (expected first seq {expected_seq})",
                    segment=segment.path.name, offset=0, seq=segment.first_seq,
                )
            expected_seq, expected_hash = segment.first_seq, segment.prev_hash
            torn: list[TornTail] = []
            for batch in segment.batches(last=index == len(paths) - 1, after=after, torn=torn):
                expected_seq, expected_hash = batch[-1].seq + 1, batch[-1].hash
                yield batch
            if torn:
                self.torn = torn[0]

    async def read(self, after: int = 0) -> AsyncIterator[list[records.Record]]:
        """`batches` as the async iterator every backend's `read` is (for one fold)."""
        for batch in self.batches(after):
            yield batch

    def events(self, after: int = 0) -> Iterator[ev.Event]:
        for record in self.records(after):
            yield record.event()


class LogTail:
    """Follows a log another process is writing: each `poll()` returns the whole records
    appended since the last poll, reading only the new bytes (followers poll often).

    Records are checked as everywhere (checksum, seq, hash chain from `after_hash`). An
    incomplete record at the end is a write in progress: it is read again next time. The
    segment being followed is held open, so retention dropping it meanwhile takes
    nothing this follower has not read yet.
    """

    def __init__(self, path: str | os.PathLike, after_seq: int, after_hash: bytes) -> None:
        self.path = Path(path)
        self._fd: int | None = None  # the segment followed, held open
        self.seq, self.prev = after_seq + 1, after_hash  # the next record expected
        paths = list_segments(self.path)
        if not paths:
            raise FileNotFoundError(f"{self.path} is not an event log: no segment files")
        if int(paths[0].name[:20]) > self.seq:
            raise retain.trimmed(f"event log {self.path}", int(paths[0].name[:20]), self.seq,
                                 paths[0].name)
        self.segment = paths[0]
        for candidate in paths:  # the segment that holds (or will hold) seq `after + 1`
            if int(candidate.name[:20]) <= self.seq:
                self.segment = candidate
        self._fd = open_regular(self.segment, os.O_RDONLY)
        self.offset = self._offset_of(self._fd, int(self.segment.name[:20]), self.seq)

    @staticmethod
    def _offset_of(fd: int, first: int, seq: int) -> int:
        """Byte offset where record `seq` starts (or will start) in the segment open as
        `fd`, whose first record is `first`."""
        data = os.pread(fd, 1 << 30, 0)
        offset, current = SEGMENT_HEADER.size, first
        while current < seq and offset < len(data):
            try:
                _, offset = records.decode(data, offset, check=False)
            except records.Damage:
                break
            current += 1
        return offset

    def poll(self) -> list[records.Record]:
        """The new whole records, possibly across segments; [] if there are none."""
        found: list[records.Record] = []
        while True:
            data = os.pread(self._fd, 1 << 30, self.offset)
            batch, used, seq, prev, why = scan_batch(data, 0, self.seq, self.prev, 1 << 30)
            found += batch
            self.offset += used
            self.seq, self.prev = seq, prev
            if why in (records.WRONG_SEQ, records.BROKEN_CHAIN):
                raise LogCorrupted(
                    f"event log corrupted in {self.segment} at offset {self.offset} "
                    f"(seq {self.seq}) while following it",
                    segment=self.segment.name, offset=self.offset, seq=self.seq,
                )
            following = self.path / segment_name(self.seq)
            if why == records.SCANNED and following != self.segment and following.exists() and (
                following.stat().st_size >= SEGMENT_HEADER.size
            ):
                fd = open_regular(following, os.O_RDONLY)  # the writer rotated: go on there
                os.close(self._fd)
                self._fd, self.segment, self.offset = fd, following, SEGMENT_HEADER.size
                continue
            return found

    def close(self) -> None:
        """Let go of the segment held open."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()
