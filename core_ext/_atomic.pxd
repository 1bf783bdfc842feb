# Atomic access to the ledger's int64 counters, shared with other processes through a
# mapped file, and the clock the assignment caps count in. GCC/Clang builtins: lock-free
# on every 64-bit platform CPython runs on.

from libc.stdint cimport int64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>

    static inline int64_t ledger_get(const int64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void ledger_set(int64_t *p, int64_t value) {
        __atomic_store_n(p, value, __ATOMIC_RELEASE);
    }
    static inline int ledger_swap(int64_t *p, int64_t expected, int64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline void ledger_add(int64_t *p, int64_t value) {
        __atomic_add_fetch(p, value, __ATOMIC_ACQ_REL);
    }
    static inline int64_t monotonic_ns(void) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        return (int64_t)now.tv_sec * 1000000000LL + now.tv_nsec;
    }
    """
    int64_t ledger_get(const int64_t *p) nogil
    void ledger_set(int64_t *p, int64_t value) nogil
    bint ledger_swap(int64_t *p, int64_t expected, int64_t desired) nogil
    void ledger_add(int64_t *p, int64_t value) nogil
    int64_t monotonic_ns() nogil
