# cython: language_level=3
"""The compiled record scanner: `_scan_py` in C, for replay speed.

Same function, same results (a differential test checks it). CRC-32 comes from zlib and
SHA-256 from OpenSSL's libcrypto, called directly, which is where the time goes: through
`zlib.crc32` and `hashlib`, the object overhead costs more than the hashing.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp

from dispatcher.eventlog.records import BROKEN_CHAIN, DAMAGED, SCANNED, WRONG_SEQ, Record
from dispatcher.eventlog.records import HEADER as _HEADER
from dispatcher.eventlog.records import MAGIC as _MAGIC
from dispatcher.eventlog.records import MAX_PAYLOAD as _MAX_PAYLOAD


cdef extern from "zlib.h" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int len)

cdef extern from "openssl/sha.h" nogil:
    unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md)

cdef Py_ssize_t HEADER_SIZE = _HEADER.size
cdef uint32_t MAX_PAYLOAD = _MAX_PAYLOAD
cdef bytes MAGIC = _MAGIC
cdef int SCANNED_ = SCANNED, DAMAGED_ = DAMAGED, WRONG_SEQ_ = WRONG_SEQ
cdef int BROKEN_CHAIN_ = BROKEN_CHAIN


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
