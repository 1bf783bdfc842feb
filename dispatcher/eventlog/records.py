"""The record format: framing, checksum and hash chain, shared by every backend.

A record is an event's orjson payload with its sequence number and the hash of the record
before it. On disk (big-endian)::

    magic   u32   b"IMDR", so a scan can find the next record after damage
    length  u32   payload bytes
    crc     u32   CRC-32 of seq, prev_hash and payload: catches torn and flipped bytes
    seq     u64   1, 2, 3, ... without gaps
    prev    32s   SHA-256 hash of the previous record (32 zero bytes before the first)
    payload       the event as JSON

A record's hash is SHA-256(seq || prev || payload). Every record carries the previous
record's hash, so editing any record, even with a recomputed CRC, breaks the chain at the
record after it; a snapshot keeps the hash at its seq, which seals the records before it.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import orjson

from dispatcher.domain import events as ev
from dispatcher.domain.errors import MalformedEvent
from dispatcher.eventlog.errors import RecordTooLarge

MAGIC = b"IMDR"
HEADER = struct.Struct(">4sIIQ32s")
SEQ = struct.Struct(">Q")
GENESIS_HASH = bytes(32)

# Why a scan (`_scan.scan_batch`) stopped.
SCANNED = 0  # end of the data, or the batch is full
DAMAGED = 1  # no whole, checksummed record here: torn or corrupted
WRONG_SEQ = 2  # a whole record with another sequence number
BROKEN_CHAIN = 3  # a whole record that does not link to the one before
LOST = 4  # JetStream: a message missing from a consumer's delivery (its count skips one)
UNUSUAL = 5  # JetStream: headers not in the form this writer writes: check it the slow way
# A record as a JetStream message: the payload is the message data, and two headers carry
# the rest (the seq is the stream's own); see `dispatcher.eventlog.jetstream`.
FORMAT = "1"
FORMAT_HEADER = "Imd-Format"
PREV_HEADER = "Imd-Prev-Hash"
FORMAT_LINE = f"\r\n{FORMAT_HEADER}: {FORMAT}\r\n".encode()  # as this writer writes them
PREV_LINE = f"\r\n{PREV_HEADER}: ".encode()  # followed by 64 hex digits and CRLF
MAX_PAYLOAD = 16 * 1024 * 1024
"""A record larger than this is damage, not data (a config event is a few kilobytes)."""


@dataclass(slots=True)
class Record:
    seq: int
    prev_hash: bytes
    payload: bytes
    hash: bytes

    def event(self) -> ev.Event:
        try:
            data = orjson.loads(self.payload)
        except orjson.JSONDecodeError as exc:
            raise MalformedEvent(f"record {self.seq} is not a JSON event: {exc}") from None
        return ev.from_dict(data)


def record_hash(seq: int, prev_hash: bytes, payload: bytes) -> bytes:
    return hashlib.sha256(SEQ.pack(seq) + prev_hash + payload).digest()


def encode(seq: int, prev_hash: bytes, payload: bytes) -> tuple[bytes, bytes]:
    """Return (the framed record, its hash)."""
    body = SEQ.pack(seq) + prev_hash + payload
    return (
        MAGIC + struct.pack(">II", len(payload), zlib.crc32(body)) + body,
        hashlib.sha256(body).digest(),
    )


@dataclass(frozen=True, slots=True)
class Entry:
    """An event encoded once, as every backend stores it: the journal applies these very
    bytes (decoded) and the log writes them, so the live state is what a replay builds."""

    seq: int
    payload: bytes

    @classmethod
    def of(cls, event: ev.Event) -> Entry:
        """Encode a stamped event (raises `TypeError` for what JSON cannot hold)."""
        return cls(event.seq, orjson.dumps(event))

    def event(self) -> ev.Event:
        """The event exactly as a reader of the log will see it."""
        return Record(self.seq, b"", self.payload, b"").event()


def check_size(entry: Entry, limit: int) -> None:
    """Refuse a record larger than a backend stores (`limit`: its `max_payload`)."""
    if len(entry.payload) > limit:
        raise RecordTooLarge(
            f"event {entry.seq} is {len(entry.payload)} bytes encoded, over the event "
            f"log's record limit of {limit} bytes"
        )


class Damage(Exception):
    """Why the bytes at an offset are not a valid record (internal to scanning)."""

    def __init__(self, problem: str, *, torn: bool = False) -> None:
        super().__init__(problem)
        self.torn = torn  # the record runs past the end of the data: an unfinished write


def decode(data: bytes, offset: int, *, check: bool = True) -> tuple[Record, int]:
    """Parse the record at `offset`; return it and the offset after it.

    With `check` (the default) the checksum is verified and the hash computed; without,
    only the framing is read (for skipping quickly to a sequence number). Raises `Damage`
    for anything that is not a whole record with a good checksum.
    """
    end = len(data)
    if offset + HEADER.size > end:
        raise Damage(f"{end - offset} bytes, less than a record header", torn=True)
    magic, length, crc, seq, prev = HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        raise Damage("no record marker")
    if length > MAX_PAYLOAD:
        raise Damage(f"record length {length} is larger than any record")
    stop = offset + HEADER.size + length
    if stop > end:
        raise Damage(
            f"record of {length} bytes cut short at {end - offset - HEADER.size}", torn=True
        )
    if not check:
        return Record(seq, prev, b"", b""), stop
    body = data[offset + 12:stop]
    if zlib.crc32(body) != crc:
        raise Damage("checksum mismatch")
    return Record(seq, prev, body[40:], hashlib.sha256(body).digest()), stop


def find_valid_record(data: bytes, start: int) -> int | None:
    """The offset of the first whole, checksummed record at or after `start`, if any."""
    position = data.find(MAGIC, start)
    while position != -1:
        try:
            decode(data, position)
            return position
        except Damage:
            position = data.find(MAGIC, position + 1)
    return None
