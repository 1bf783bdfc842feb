"""The ledger: per-node counters that every worker process of one dispatcher shares.

A selector's round-robin positions are its own, but two figures must be the same for every
process that picks, or `high_watermark` and the assignment cap would mean N times as much
with N workers:

- `load`: the node's reported connections plus the picks made since that report, by any
  process. A pick takes a client only if the load stays below the high watermark, with one
  compare-and-swap, so two processes can never both take the last place.
- `picks` (every pick ever made of the node, each counted as the picking selector's
  share: see `Selector.set_share`; `load` counts them the same way), `asked` (what
  `picks` was when the poller last asked the node for its load) and `mark` (what it was
  the time before; -1 until the poller has asked twice): a report leaves pending the picks
  made after `mark`, those that cannot be in the answer, and those whose clients may still
  be connecting (a client has a whole poll interval to do it before its place is taken as
  filled by the figure).
- `due`: the assignment cap's GCRA "theoretical arrival time" (CLOCK_MONOTONIC
  nanoseconds, one clock for every process on the machine), and `interval`, the rate it
  was counted at, so a changed rate restarts the allowance once, not once per process.

The ledger is a file mapped into every process (`Ledger.shared(path)`), or anonymous
memory for a selector of its own (`Ledger()`). Each node has one 64-byte slot, found by a
digest of its id, so processes that add the same node share its slot whatever order they
add nodes in. Slots are claimed and released (a count of holders) under an exclusive
`flock` of the file; that only happens when nodes are added or removed. The compiled
selector updates the counters with C atomics; the pure-Python twin takes the same lock for
each update, which is slow and correct, as a specification should be.

Layout, little-endian int64 fields: a 64-byte header (magic, version, slot count), then
per slot `load, due, interval, holders, digest[8], picks, asked, mark`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from core_ext.errors import SelectorError

MAGIC = b"IMDLEDG1"
VERSION = 1
HEADER = struct.Struct("<8sqq")
HEADER_SIZE = 64
SLOT_SIZE = 64
DEFAULT_SLOTS = 65536
# field offsets in a slot (bytes), shared with the compiled selector through these names
LOAD, DUE, INTERVAL, HOLDERS, DIGEST, PICKS, ASKED, MARK = 0, 8, 16, 24, 32, 40, 48, 56
DIGEST_SIZE = 8
_INT = struct.Struct("<q")


class LedgerError(SelectorError):
    """The ledger file cannot be used (another format, full, unreadable)."""


def digest(node_id: str) -> bytes:
    """The slot key of a node id (ids of any length fit a fixed slot)."""
    return hashlib.blake2b(node_id.encode("utf-8", "surrogatepass"),
                           digest_size=DIGEST_SIZE).digest()


class Ledger:
    """Shared (file) or private (anonymous) counters; see the module docstring.

    `reports` says whether a selector on this handle writes reported loads into the
    ledger. Exactly one process should (the one that polls the nodes): the others apply the
    same reports later, from the event log, and must not wipe the picks made since.
    """

    def __init__(self, slots: int = DEFAULT_SLOTS, *, reports: bool = True,
                 _fd: int | None = None) -> None:
        if type(slots) is not int or not 1 <= slots <= 1 << 20:
            raise LedgerError(f"a ledger has 1..{1 << 20} slots, got {slots!r}")
        self.reports = reports
        self.path: Path | None = None
        self._fd = _fd
        size = HEADER_SIZE + slots * SLOT_SIZE
        if _fd is None:
            self.memory = mmap.mmap(-1, size)
            HEADER.pack_into(self.memory, 0, MAGIC, VERSION, slots)
        else:
            self.memory = mmap.mmap(_fd, size)
        self.slots = slots

    @staticmethod
    def create(path: str | os.PathLike[str], slots: int = DEFAULT_SLOTS) -> None:
        """Make the ledger file at `path` (it must not exist), its blocks allocated now:
        a full disk says so here, once, instead of as a SIGBUS in the middle of a pick.
        The dispatcher's supervisor does this before it starts any worker."""
        if type(slots) is not int or not 1 <= slots <= 1 << 20:
            raise LedgerError(f"a ledger has 1..{1 << 20} slots, got {slots!r}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, HEADER_SIZE + slots * SLOT_SIZE)
            os.pwrite(fd, HEADER.pack(MAGIC, VERSION, slots), 0)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)

    @classmethod
    def shared(cls, path: str | os.PathLike[str], *, reports: bool) -> Ledger:
        """Map the ledger file that `create` made. A file that is gone is an error, never
        a new ledger: a worker counting on its own would let nodes overfill."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise LedgerError(f"the workers' shared ledger {path} is gone; restart the "
                              "dispatcher") from None
        try:
            magic, version, slots = HEADER.unpack(
                os.pread(fd, HEADER.size, 0).ljust(HEADER.size, b"\0"))
            if magic != MAGIC or version != VERSION:
                raise LedgerError(f"{path} is not a ledger of version {VERSION}")
            if not 1 <= slots <= 1 << 20 or (
                    os.fstat(fd).st_size < HEADER_SIZE + slots * SLOT_SIZE):
                raise LedgerError(f"{path} is shorter than its {slots} slots")
            ledger = cls(slots, reports=reports, _fd=fd)
        except BaseException:
            os.close(fd)
            raise
        ledger.path = Path(path)
        return ledger

    @property
    def is_shared(self) -> bool:
        return self._fd is not None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive access among processes (a no-op for a private ledger)."""
        if self._fd is None:
            yield
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- slots ------------------------------------------------------------------------

    def claim(self, node_id: str) -> int:
        """The byte offset of `node_id`'s slot, shared with every process that claimed the
        same id and has not released it; a slot nobody holds is reset before reuse."""
        key = digest(node_id)
        with self.locked():
            held, free = self._find(key)
            if held is not None:
                self.set(held, HOLDERS, self.get(held, HOLDERS) + 1)
                return held
            if free is None:
                raise LedgerError(f"the ledger's {self.slots} slots are all held; cannot "
                                  f"add node {node_id!r}")
            self.memory[free:free + SLOT_SIZE] = bytes(SLOT_SIZE)
            self.memory[free + DIGEST:free + DIGEST + DIGEST_SIZE] = key
            self.set(free, HOLDERS, 1)
            self.set(free, MARK, -1)
            return free

    def holds(self, node_id: str) -> bool:
        """Whether a selector (in any process) holds `node_id`'s slot now."""
        with self.locked():
            return self._find(digest(node_id))[0] is not None

    def _find(self, key: bytes) -> tuple[int | None, int | None]:
        """(the held slot with this key, the first slot nobody holds), probing from the
        key's place up to the first slot never used: the key is not further on."""
        start = int.from_bytes(key, "little") % self.slots
        free = None
        for step in range(self.slots):
            offset = HEADER_SIZE + (start + step) % self.slots * SLOT_SIZE
            holders = self.get(offset, HOLDERS)
            stored = self.memory[offset + DIGEST:offset + DIGEST + DIGEST_SIZE]
            if holders > 0 and stored == key:
                return offset, free
            if holders <= 0 and free is None:
                free = offset
            if stored == bytes(DIGEST_SIZE):
                break
        return None, free

    def release(self, offset: int) -> None:
        """This selector no longer holds the slot (its node was removed)."""
        with self.locked():
            self.set(offset, HOLDERS, max(0, self.get(offset, HOLDERS) - 1))

    # -- fields (the reference selector's access; call under `locked()` when shared) ---

    def get(self, offset: int, field: int) -> int:
        return _INT.unpack_from(self.memory, offset + field)[0]

    def set(self, offset: int, field: int, value: int) -> None:
        _INT.pack_into(self.memory, offset + field, value)

    def close(self) -> None:
        """Unmap and close (fails while a compiled selector still points into it)."""
        self.memory.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        where = self.path if self.is_shared else "private"
        return f"<core_ext.ledger.Ledger {where} slots={self.slots} reports={self.reports}>"
