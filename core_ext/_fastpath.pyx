# cython: language_level=3
"""The get-tcp-ip fast path's byte work in C: `_fastpath_py` compiled (same results; a
differential test checks it). It reads the connection's bytearray in place and builds an
answer with one allocation.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdio cimport snprintf
from libc.string cimport memcmp, memcpy

NOT_FAST = -1
cdef int _NOT_FAST = -1
cdef Py_ssize_t MAX_UID = 128

cdef const char *REQUEST_LINE = b"GET /get-tcp-ip"
cdef Py_ssize_t REQUEST_LINE_SIZE = 15
cdef const char *VERSION = b"HTTP/1.1\r\n"  # or 1.0: byte 7 differs
cdef Py_ssize_t VERSION_SIZE = 10


cdef inline bint _same_lower(const unsigned char *p, Py_ssize_t n, const char *word,
                             Py_ssize_t size) noexcept nogil:
    """Whether p[:n], lowercased (ASCII), is `word`."""
    cdef Py_ssize_t k
    cdef unsigned char c
    if n != size:
        return False
    for k in range(n):
        c = p[k]
        if 0x41 <= c <= 0x5A:
            c += 0x20
        if c != <unsigned char>word[k]:
            return False
    return True


cdef inline bint _refused(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    return (_same_lower(p, n, b"content-length", 14) or _same_lower(p, n, b"expect", 6)
            or _same_lower(p, n, b"transfer-encoding", 17) or _same_lower(p, n, b"upgrade", 7))


def scan(bytearray buf not None, Py_ssize_t start, Py_ssize_t max_head):
    """See `_fastpath_py.scan`."""
    cdef const unsigned char *p = <const unsigned char *>PyByteArray_AS_STRING(buf) + start
    cdef Py_ssize_t n = PyByteArray_GET_SIZE(buf) - start
    cdef Py_ssize_t i, k, query_start, query_end, line, colon, value
    cdef unsigned char c
    cdef bint keep_alive
    if start < 0 or n < REQUEST_LINE_SIZE or memcmp(p, REQUEST_LINE, REQUEST_LINE_SIZE) != 0:
        return _NOT_FAST
    i = query_start = query_end = REQUEST_LINE_SIZE
    if i < n and p[i] == b'?':
        i += 1
        query_start = i
        while i < n and 0x21 <= p[i] <= 0x7E and p[i] != b'#':
            i += 1
        query_end = i
    if i >= n or p[i] != b' ' or n - i - 1 < VERSION_SIZE:
        return _NOT_FAST
    i += 1  # the space
    for k in range(VERSION_SIZE):
        if p[i + k] != <unsigned char>VERSION[k] and not (k == 7 and p[i + k] == b'0'):
            return _NOT_FAST
    keep_alive = p[i + 7] == b'1'
    i += VERSION_SIZE
    while True:
        if i + 1 < n and p[i] == b'\r' and p[i + 1] == b'\n':
            if i - 2 >= max_head:
                return _NOT_FAST
            return start + i + 2, keep_alive, start + query_start, start + query_end
        line = i
        colon = -1
        while i < n and p[i] != b'\r':
            c = p[i]
            if c == b':':
                if colon < 0:
                    colon = i
            elif (c < 0x20 and c != b'\t') or c > 0x7E:
                return _NOT_FAST
            i += 1
        if i + 1 >= n:
            return _NOT_FAST
        if p[i + 1] != b'\n' or colon < 0:
            return _NOT_FAST
        if _refused(p + line, colon - line):
            return _NOT_FAST
        if _same_lower(p + line, colon - line, b"connection", 10):
            value = colon + 1
            while value < i and (p[value] == b' ' or p[value] == b'\t'):
                value += 1
            keep_alive = _same_lower(p + value, i - value, b"keep-alive", 10)
        i += 2


def plain_query(bytearray buf not None, Py_ssize_t start, Py_ssize_t end):
    """See `_fastpath_py.plain_query`."""
    cdef const unsigned char *p = <const unsigned char *>PyByteArray_AS_STRING(buf)
    cdef Py_ssize_t i = start, name, equals
    cdef bint uid = False
    if start < 0 or end > PyByteArray_GET_SIZE(buf) or start > end:
        return False
    while True:  # one pair a turn: name[=value], up to '&' or the end
        name = i
        equals = -1
        while i < end and p[i] != b'&':
            if p[i] == b'%' or p[i] == b'+':
                return False
            if p[i] == b'=' and equals < 0:
                equals = i
            i += 1
        if equals < 0:
            equals = i
        if equals - name == 3 and memcmp(p + name, b"uid", 3) == 0:
            if uid or not 1 <= i - equals - 1 <= MAX_UID:
                return False
            uid = True
        elif ((equals - name == 7 and memcmp(p + name, b"exclude", 7) == 0)
              or (equals - name == 5 and memcmp(p + name, b"count", 5) == 0)):
            return False
        if i >= end:
            return True
        i += 1  # the '&'


def frame(bytes status_line not None, long retry_after, bytes body not None,
          bint keep_alive):
    """See `_fastpath_py.frame`."""
    cdef char head[160]
    cdef Py_ssize_t status_size = PyBytes_GET_SIZE(status_line)
    cdef Py_ssize_t body_size = PyBytes_GET_SIZE(body)
    cdef int size
    cdef const char *connection = b"keep-alive" if keep_alive else b"close"
    if retry_after:
        size = snprintf(head, sizeof(head), b"Retry-After: %ld\r\ncontent-length: %zd\r\n"
                        b"connection: %s\r\ncontent-type: application/json\r\n\r\n",
                        retry_after, body_size, connection)
    else:
        size = snprintf(head, sizeof(head), b"content-length: %zd\r\nconnection: %s\r\n"
                        b"content-type: application/json\r\n\r\n", body_size, connection)
    cdef bytes answer = PyBytes_FromStringAndSize(NULL, status_size + size + body_size)
    cdef char *out = PyBytes_AS_STRING(answer)
    memcpy(out, PyBytes_AS_STRING(status_line), status_size)
    memcpy(out + status_size, head, size)
    memcpy(out + status_size + size, PyBytes_AS_STRING(body), body_size)
    return answer
