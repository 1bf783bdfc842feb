# cython: language_level=3
"""The compiled record scanners: `_scan_py` in C, for replay speed.

Same function, same results (a differential test checks it). CRC-32 comes from zlib and
SHA-256 from OpenSSL's libcrypto, called directly, which is where the time goes: through
`zlib.crc32` and `hashlib`, the object overhead costs more than the hashing.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp

from dispatcher.eventlog._digits cimport parse_digits

from dispatcher.eventlog.records import (
    BROKEN_CHAIN, DAMAGED, LOST, SCANNED, UNUSUAL, WRONG_SEQ, Record,
)
from dispatcher.eventlog.records import FORMAT_LINE as _FORMAT_LINE
from dispatcher.eventlog.records import PREV_LINE as _PREV_LINE
from dispatcher.eventlog.records import HEADER as _HEADER
from dispatcher.eventlog.records import MAGIC as _MAGIC
from dispatcher.eventlog.records import MAX_PAYLOAD as _MAX_PAYLOAD


cdef extern from "zlib.h" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int len)

cdef extern from "openssl/sha.h" nogil:
    ctypedef struct SHA256_CTX:
        pass
    unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md)
    int SHA256_Init(SHA256_CTX *c)
    int SHA256_Update(SHA256_CTX *c, const void *data, size_t n)
    int SHA256_Final(unsigned char *md, SHA256_CTX *c)

cdef extern from "string.h" nogil:
    void *memmem(const void *haystack, size_t haystacklen, const void *needle,
                 size_t needlelen)

cdef Py_ssize_t HEADER_SIZE = _HEADER.size
cdef uint32_t MAX_PAYLOAD = _MAX_PAYLOAD
cdef bytes MAGIC = _MAGIC
cdef int SCANNED_ = SCANNED, DAMAGED_ = DAMAGED, WRONG_SEQ_ = WRONG_SEQ
cdef int BROKEN_CHAIN_ = BROKEN_CHAIN, LOST_ = LOST, UNUSUAL_ = UNUSUAL
cdef bytes FORMAT_LINE = _FORMAT_LINE, PREV_LINE = _PREV_LINE


cdef inline uint32_t _be32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _be64(const unsigned char *p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | _be32(p + 4)


def scan_batch(bytes data not None, Py_ssize_t offset, uint64_t seq, bytes prev not None,
               Py_ssize_t limit):
    """See `_scan_py.scan_batch`."""
    cdef const unsigned char *base = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef const unsigned char *record
    cdef Py_ssize_t end = PyBytes_GET_SIZE(data), stop, body, count = 0
    cdef unsigned char digest[32]
    cdef list out = []
    cdef int why = SCANNED_
    if offset < 0 or PyBytes_GET_SIZE(prev) != 32:
        raise ValueError("offset must be >= 0 and prev a 32-byte hash")
    while offset < end and count < limit:
        record = base + offset
        if offset + HEADER_SIZE > end or memcmp(record, PyBytes_AS_STRING(MAGIC), 4) != 0:
            why = DAMAGED_
            break
        if _be32(record + 4) > MAX_PAYLOAD:
            why = DAMAGED_
            break
        stop = offset + HEADER_SIZE + _be32(record + 4)
        body = stop - offset - 12  # what the checksum and the hash cover: seq, prev, payload
        if stop > end or crc32(0, record + 12, <unsigned int>body) != _be32(record + 8):
            why = DAMAGED_
            break
        if _be64(record + 12) != seq:
            why = WRONG_SEQ_
            break
        if memcmp(record + 20, PyBytes_AS_STRING(prev), 32) != 0:
            why = BROKEN_CHAIN_
            break
        SHA256(record + 12, <size_t>body, digest)
        link = prev
        prev = PyBytes_FromStringAndSize(<const char *>digest, 32)
        payload = PyBytes_FromStringAndSize(
            <const char *>record + HEADER_SIZE, stop - offset - HEADER_SIZE
        )
        out.append(Record(seq, link, payload, prev))
        count += 1
        offset = stop
        seq += 1
    return out, offset, seq, prev, why


cdef inline int _hex_digit(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


cdef bint _reply_seqs(bytes reply, uint64_t *sseq, uint64_t *dseq):
    """The stream seq and delivery count in a JetStream ack subject:
    $JS.ACK.[domain.account.]stream.consumer.n.sseq.dseq.time.pending[.token]."""
    cdef const char *p = PyBytes_AS_STRING(reply)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(reply), i, tokens = 1, at
    cdef Py_ssize_t starts[13]
    starts[0] = 0
    for i in range(n):
        if p[i] == 46:  # "."
            if tokens == 12:
                return False
            starts[tokens] = i + 1
            tokens += 1
    if tokens != 9 and tokens != 12:
        return False
    starts[tokens] = n + 1
    at = 5 if tokens == 9 else 7
    return (parse_digits(p + starts[at], starts[at + 1] - starts[at] - 1, 19, sseq)
            and parse_digits(p + starts[at + 1], starts[at + 2] - starts[at + 1] - 1, 19, dseq))


cdef class MessageScanner:
    """See `_scan_py.MessageScanner`."""

    cdef public uint64_t delivered, seq
    cdef public object prev

    def __init__(self, uint64_t seq, prev=None):
        self.delivered, self.seq, self.prev = 1, seq, prev

    def passed(self, record):
        self.delivered, self.seq, self.prev = self.delivered + 1, record.seq + 1, record.hash

    def scan(self, list messages not None, Py_ssize_t start, uint64_t last, list out not None):
        cdef Py_ssize_t index = start, size, hex_at, i
        cdef uint64_t sseq, dseq
        cdef const char *head
        cdef const char *found
        cdef unsigned char link[32]
        cdef unsigned char digest[32]
        cdef unsigned char seq_be[8]
        cdef int high, low
        cdef SHA256_CTX ctx
        cdef bytes data, block, prev
        cdef tuple message
        while index < len(messages) and self.seq <= last:
            message = messages[index]
            if type(message[0]) is not bytes or not _reply_seqs(message[0], &sseq, &dseq) \
                    or dseq != self.delivered:
                return index, LOST_, 0
            if sseq != self.seq:
                return index, WRONG_SEQ_, sseq
            block, data = message[1], message[2]
            if block is None or data is None:
                return index, UNUSUAL_, sseq
            head, size = PyBytes_AS_STRING(block), PyBytes_GET_SIZE(block)
            found = NULL
            if memmem(head, size, PyBytes_AS_STRING(FORMAT_LINE),
                      PyBytes_GET_SIZE(FORMAT_LINE)) != NULL:
                found = <const char *>memmem(head, size, PyBytes_AS_STRING(PREV_LINE),
                                             PyBytes_GET_SIZE(PREV_LINE))
            if found == NULL:
                return index, UNUSUAL_, sseq
            hex_at = found - head + PyBytes_GET_SIZE(PREV_LINE)
            if hex_at + 66 > size or head[hex_at + 64] != 13 or head[hex_at + 65] != 10:
                return index, UNUSUAL_, sseq
            for i in range(32):
                high = _hex_digit(head[hex_at + 2 * i])
                low = _hex_digit(head[hex_at + 2 * i + 1])
                if high < 0 or low < 0:
                    return index, UNUSUAL_, sseq
                link[i] = <unsigned char>(high * 16 + low)
            if self.prev is not None:
                prev = self.prev
                if PyBytes_GET_SIZE(prev) != 32 or memcmp(link, PyBytes_AS_STRING(prev), 32):
                    return index, BROKEN_CHAIN_, sseq
            for i in range(8):
                seq_be[i] = <unsigned char>(sseq >> (56 - 8 * i))
            SHA256_Init(&ctx)
            SHA256_Update(&ctx, seq_be, 8)
            SHA256_Update(&ctx, link, 32)
            SHA256_Update(&ctx, PyBytes_AS_STRING(data), <size_t>PyBytes_GET_SIZE(data))
            SHA256_Final(digest, &ctx)
            prev = PyBytes_FromStringAndSize(<const char *>digest, 32)
            out.append(Record(sseq, PyBytes_FromStringAndSize(<const char *>link, 32), data,
                              prev))
            self.delivered, self.seq, self.prev = self.delivered + 1, sseq + 1, prev
            index += 1
        return index, SCANNED_, 0
