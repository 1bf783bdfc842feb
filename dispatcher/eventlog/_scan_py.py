"""The record scanner in pure Python: the twin of the compiled `_scan` (same results).

`scan_batch` is the replay hot path: it reads consecutive records from a segment's bytes,
checking each one's framing, checksum, sequence number and hash link, and stops at the
first one that fails, saying why. Explaining the failure is left to the caller.
"""

from __future__ import annotations

import hashlib
import zlib

from dispatcher.eventlog.records import (
    BROKEN_CHAIN,
    DAMAGED,
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    SCANNED,
    WRONG_SEQ,
    Record,
)


def scan_batch(
    data: bytes, offset: int, seq: int, prev: bytes, limit: int
) -> tuple[list[Record], int, int, bytes, int]:
    """Verified records from `offset`, at most `limit`, the first expected to be `seq`
    and to link to `prev`. Returns (records, offset, seq, prev, why) for where it stopped:
    `why` is SCANNED (end of data or limit), DAMAGED (no whole, checksummed record at
    `offset`), WRONG_SEQ or BROKEN_CHAIN (a whole record that does not belong there)."""
    if offset < 0 or len(prev) != 32:
        raise ValueError("offset must be >= 0 and prev a 32-byte hash")
    out: list[Record] = []
    unpack, crc32, sha256 = HEADER.unpack_from, zlib.crc32, hashlib.sha256
    end = len(data)
    while offset < end and len(out) < limit:
        stop = offset + HEADER.size
        if stop > end:
            return out, offset, seq, prev, DAMAGED
        magic, length, crc, found, link = unpack(data, offset)
        stop += length
        if magic != MAGIC or length > MAX_PAYLOAD or stop > end:
            return out, offset, seq, prev, DAMAGED
        body = data[offset + 12:stop]
        if crc32(body) != crc:
            return out, offset, seq, prev, DAMAGED
        if found != seq:
            return out, offset, seq, prev, WRONG_SEQ
        if link != prev:
            return out, offset, seq, prev, BROKEN_CHAIN
        digest = sha256(body).digest()
        out.append(Record(seq, link, body[40:], digest))
        offset, seq, prev = stop, seq + 1, digest
    return out, offset, seq, prev, SCANNED
