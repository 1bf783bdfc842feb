"""The record scanners in pure Python: the twin of the compiled `_scan` (same results).

They are replay's hot paths. `scan_batch` reads consecutive records from a segment's
bytes, checking each one's framing, checksum, sequence number and hash link.
`MessageScanner` does the same for records as a JetStream push consumer delivers them.
Both stop at the first one that fails, saying why; explaining it is left to the caller.
"""

from __future__ import annotations

import hashlib
import zlib

from dispatcher.eventlog.records import (
    BROKEN_CHAIN,
    DAMAGED,
    FORMAT_LINE,
    HEADER,
    LOST,
    MAGIC,
    MAX_PAYLOAD,
    PREV_LINE,
    SCANNED,
    SEQ,
    UNUSUAL,
    WRONG_SEQ,
    Record,
)

_HASH_AT = len(PREV_LINE)  # where the hex digits start after PREV_LINE
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _number(token: bytes) -> bool:
    """A seq or count in a reply subject: 1 to 19 ASCII digits (it fits in 64 bits)."""
    return 0 < len(token) < 20 and token.isdigit()


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


class MessageScanner:
    """Checks messages of one read in the order a push consumer delivered them, as
    (ack reply subject, raw header block, data): the reply subject says the message's
    stream seq and the consumer's delivery count; the headers hold the previous hash.

    `seq` is the stream seq expected next, `prev` the hash the next record must link to
    (None: not checked), `delivered` the delivery count expected next (1 for each new
    consumer: the caller resets it)."""

    def __init__(self, seq: int, prev: bytes | None = None) -> None:
        self.delivered, self.seq, self.prev = 1, seq, prev

    def passed(self, record: Record) -> None:
        """Count a record that the caller checked itself (after UNUSUAL)."""
        self.delivered, self.seq, self.prev = self.delivered + 1, record.seq + 1, record.hash

    def scan(self, messages: list, start: int, last: int,
             out: list[Record]) -> tuple[int, int, int]:
        """Append to `out` the records of `messages[start:]`, up to stream seq `last`,
        until one fails. Returns (index, why, seq found there): why is SCANNED (all
        done), LOST (the delivery count skips: lost in transit, or not from the
        consumer), WRONG_SEQ, UNUSUAL (headers in another form: the caller checks it) or
        BROKEN_CHAIN."""
        index = start
        while index < len(messages) and self.seq <= last:
            reply, block, data = messages[index]
            if type(reply) is not bytes:
                return index, LOST, 0
            tokens = reply.split(b".")  # $JS.ACK.[domain.account.]stream.consumer.n.sseq.dseq...
            at = 5 if len(tokens) == 9 else 7
            if len(tokens) not in (9, 12) or not _number(tokens[at]) \
                    or not _number(tokens[at + 1]) or int(tokens[at + 1]) != self.delivered:
                return index, LOST, 0
            seq = int(tokens[at])
            if seq != self.seq:
                return index, WRONG_SEQ, seq
            if block is None or data is None:
                return index, UNUSUAL, seq
            at = block.find(PREV_LINE) if FORMAT_LINE in block else -1
            digits = block[at + _HASH_AT:at + _HASH_AT + 64] if at >= 0 else b""
            if len(digits) != 64 or not _HEX.issuperset(digits) \
                    or block[at + _HASH_AT + 64:at + _HASH_AT + 66] != b"\r\n":
                return index, UNUSUAL, seq
            link = bytes.fromhex(digits.decode())
            if self.prev is not None and link != self.prev:
                return index, BROKEN_CHAIN, seq
            digest = hashlib.sha256(SEQ.pack(seq) + link + data).digest()
            out.append(Record(seq, link, data, digest))
            self.delivered, self.seq, self.prev = self.delivered + 1, seq + 1, digest
            index += 1
        return index, SCANNED, 0
