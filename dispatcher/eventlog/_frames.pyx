# cython: language_level=3
"""The compiled frame splitter: `_frames_py` in C, for bulk reads' speed."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp

from dispatcher.eventlog._digits cimport parse_digits

from dispatcher.eventlog._frames_py import MAX_CONTROL_LINE as _MAX_CONTROL_LINE

cdef Py_ssize_t MAX_CONTROL_LINE = _MAX_CONTROL_LINE
cdef Py_ssize_t DIGITS = 9  # as `_frames_py._number`


def split_frames(bytes data not None, dict handlers not None, dropped) -> Py_ssize_t:
    """See `_frames_py.split_frames`."""
    cdef const char *base = PyBytes_AS_STRING(data)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(data), used = 0, line_end, i, count
    cdef Py_ssize_t starts[6]
    cdef uint64_t sid, header_size, total
    cdef Py_ssize_t start, stop
    cdef const char *found
    while end - used >= 5 and memcmp(base + used, b"HMSG ", 5) == 0:
        found = <const char *>memchr(base + used, 13, min(end - used, MAX_CONTROL_LINE))
        line_end = found - base if found != NULL else -1
        if line_end < 0 or line_end + 1 >= end or base[line_end + 1] != 10:
            break
        count, starts[0] = 1, used + 5  # where each argument starts
        for i in range(used + 5, line_end):
            if 9 <= base[i] <= 12:  # other whitespace: nats-py's parser splits there too
                count = 6
                break
            if base[i] == 32:
                if count == 5:
                    count = 6
                    break
                starts[count] = i + 1
                count += 1
        if count != 4 and count != 5:
            break
        starts[count] = line_end + 1
        if not (parse_digits(base + starts[1], starts[2] - starts[1] - 1, DIGITS, &sid)
                and parse_digits(base + starts[count - 2],
                                 starts[count - 1] - starts[count - 2] - 1, DIGITS, &header_size)
                and parse_digits(base + starts[count - 1], line_end - starts[count - 1], DIGITS,
                                 &total)):
            break
        handler = handlers.get(sid)
        start, stop = line_end + 2, line_end + 2 + <Py_ssize_t>total
        if handler is None or header_size > total or stop + 2 > end \
                or base[stop] != 13 or base[stop + 1] != 10:
            break
        empty = False
        for i in range(count - 1):
            if starts[i + 1] - starts[i] - 1 <= 0:
                empty = True
        if empty:
            break
        try:
            handler(
                PyBytes_FromStringAndSize(base + starts[0], starts[1] - starts[0] - 1),
                PyBytes_FromStringAndSize(base + starts[2], starts[3] - starts[2] - 1)
                if count == 5 else b"",
                PyBytes_FromStringAndSize(base + start, <Py_ssize_t>header_size)
                if header_size else None,
                PyBytes_FromStringAndSize(base + start + header_size,
                                          <Py_ssize_t>(total - header_size)),
            )
        except Exception as exc:
            dropped(exc)
        used = stop + 2
    return used
