# cython: language_level=3
"""Decimal numbers in NATS protocol text, for the compiled readers (`_frames`, `_scan`)."""

from libc.stdint cimport uint64_t


cdef inline bint parse_digits(const char *p, Py_ssize_t n, Py_ssize_t most,
                              uint64_t *value) noexcept nogil:
    """1 to `most` ASCII digits (`most` <= 19, so that it fits in 64 bits) into `value`."""
    cdef Py_ssize_t i
    value[0] = 0
    if n < 1 or n > most:
        return False
    for i in range(n):
        if p[i] < 48 or p[i] > 57:
            return False
        value[0] = value[0] * 10 + <uint64_t>(p[i] - 48)
    return True
