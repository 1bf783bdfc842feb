"""Segment files of the file log: naming, headers and the verified scan of their records.

A log is a directory of segments named by the sequence number of their first record
(`00000000000000000001.seg`), rotated by size. Each segment starts with a header::

    magic     6s   b"IMDLOG"
    version   u16  the format version (FORMAT_VERSION)
    first_seq u64  the seq of its first record
    prev_hash 32s  the hash of the record before it, so the chain crosses segments
    crc       u32  CRC-32 of the fields above

followed by records (see `records`).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import core_ext
from dispatcher.eventlog import records
from dispatcher.eventlog.errors import LogCorrupted, UnsupportedFormat
from dispatcher.eventlog.files import read_regular

FORMAT_VERSION = 1
SEGMENT_MAGIC = b"IMDLOG"
SEGMENT_HEADER = struct.Struct(">6sHQ32sI")
SUFFIX = ".seg"
SCAN_BATCH = 1024

scan_batch = core_ext.compiled_or_twin(
    "dispatcher.eventlog._scan", "dispatcher.eventlog._scan_py"
).scan_batch


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SUFFIX}"


def list_segments(directory: Path) -> list[Path]:
    """Segment files in order of their first sequence number."""
    found = []
    for path in directory.glob(f"*{SUFFIX}"):
        stem = path.name[: -len(SUFFIX)]
        if len(stem) == 20 and stem.isdigit():
            found.append(path)
    return sorted(found)


def encode_header(first_seq: int, prev_hash: bytes) -> bytes:
    fields = struct.pack(">6sHQ32s", SEGMENT_MAGIC, FORMAT_VERSION, first_seq, prev_hash)
    return fields + struct.pack(">I", zlib.crc32(fields))


@dataclass(slots=True)
class TornTail:
    """The unfinished last write of a crash: bytes after the last whole record."""

    segment: Path
    offset: int
    seq: int  # the seq the torn record would have had
    size: int  # bytes from `offset` to the end of the segment
    problem: str

    def describe(self) -> str:
        return (
            f"torn tail in {self.segment.name}: {self.size} bytes from offset {self.offset} "
            f"(seq {self.seq} onwards) are an unfinished write ({self.problem})"
        )


@dataclass(slots=True)
class Segment:
    """One segment's contents, read whole (segments are bounded by the rotation size)."""

    path: Path
    data: bytes
    first_seq: int
    prev_hash: bytes

    @classmethod
    def read(cls, path: Path) -> Segment:
        data = read_regular(path)
        if len(data) < SEGMENT_HEADER.size:
            raise LogCorrupted(
                f"{path.name}: {len(data)} bytes, shorter than a segment header",
                segment=path.name, offset=0, seq=0,
            )
        magic, version, first_seq, prev_hash, crc = SEGMENT_HEADER.unpack_from(data, 0)
        if magic != SEGMENT_MAGIC or zlib.crc32(data[: SEGMENT_HEADER.size - 4]) != crc:
            raise LogCorrupted(
                f"{path.name}: damaged segment header", segment=path.name, offset=0, seq=0
            )
        if version != FORMAT_VERSION:
            raise UnsupportedFormat(
                f"{path}: event log format version {version}; this imdispatch reads "
                f"version {FORMAT_VERSION} (written by a newer imdispatch?)"
            )
        if path.name != segment_name(first_seq):
            raise LogCorrupted(
                f"{path.name}: header says first seq {first_seq}",
                segment=path.name, offset=0, seq=first_seq,
            )
        return cls(path, data, first_seq, prev_hash)

    def batches(
        self, *, last: bool, after: int = 0, torn: list[TornTail] | None = None
    ) -> Iterator[list[records.Record]]:
        """Yield the verified records with seq > `after`, in non-empty lists.

        Checks every record's checksum, sequence and hash chain (from the header's
        prev_hash). Damage in the `last` segment with no valid record after it is a torn
        tail: the scan stops there and appends a `TornTail` to `torn`. Any other damage
        raises `LogCorrupted` naming the segment, offset and seq.
        """
        data, offset = self.data, SEGMENT_HEADER.size
        seq, prev = self.first_seq, self.prev_hash
        if after >= seq:  # skip to `after` reading only framing, then take its hash
            while offset < len(data) and seq <= after:
                try:
                    record, stop = records.decode(data, offset, check=seq == after)
                except records.Damage:
                    break  # scanned properly below, from here
                if record.seq != seq:
                    break
                if seq == after:
                    prev = record.hash
                offset, seq = stop, seq + 1
        end = len(data)
        while True:
            batch, offset, seq, prev, why = scan_batch(data, offset, seq, prev, SCAN_BATCH)
            if batch:
                yield batch
            if why == records.SCANNED:
                if offset >= end:
                    return
            elif why == records.WRONG_SEQ:
                found = records.HEADER.unpack_from(data, offset)[3]
                raise self._corrupt(offset, seq, f"found seq {found} where {seq} belongs")
            elif why == records.BROKEN_CHAIN:
                raise self._corrupt(offset, seq, "hash chain broken: the record before it "
                                    "was altered, or this one does not belong here")
            else:
                try:
                    records.decode(data, offset)
                    problem = "unreadable record"  # pragma: no cover - the scan agrees
                except records.Damage as damage:
                    problem = str(damage)
                if last and records.find_valid_record(data, offset + 1) is None:
                    if torn is not None:
                        torn.append(TornTail(self.path, offset, seq, end - offset, problem))
                    return
                raise self._corrupt(offset, seq, f"{problem}, and valid records follow"
                                    if last else problem)

    def _corrupt(self, offset: int, seq: int, problem: str) -> LogCorrupted:
        return LogCorrupted(
            f"event log corrupted in {self.path} at offset {offset} (seq {seq}): {problem}",
            segment=self.path.name, offset=offset, seq=seq,
        )
