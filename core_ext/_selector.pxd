# The compiled selector's layout: one C array per node field (struct of arrays), indexed
# by slot. Slots are dense and in the order nodes were added (nginx's peer order), so the
# pick loop walks contiguous memory and breaks ties exactly as nginx does.

from libc.stdint cimport int64_t, uint8_t


cdef class Selector:
    cdef Py_ssize_t n            # slots in use: 0 .. n-1
    cdef Py_ssize_t allocated    # length of every array below
    cdef int64_t *weight         # static weight, 0 .. MAX_WEIGHT
    cdef int64_t *effective      # dynamic weight in WEIGHT_SCALE units
    cdef int64_t *current        # smooth round-robin accumulator (nginx's current_weight)
    cdef int64_t *connections    # last reported connections
    cdef int64_t *capacity       # last reported capacity; 0 = nothing reported yet
    cdef Py_ssize_t *cell        # byte offset of the node's slot in the ledger
    cdef int64_t *interval       # assignment cap: nanoseconds per client; 0 = no cap
    cdef int64_t *tolerance      # how far ahead the cap's allowance may be spent
    cdef int64_t *shadow         # scratch for backups(): current weights played forward
    cdef int64_t *ramp           # thousandths of the weight (slow start); 1000 = full
    cdef uint8_t *up
    cdef uint8_t *draining
    cdef uint8_t *overloaded     # no picks: latched, or the load reached the high watermark
    cdef uint8_t *latched        # reported over the high watermark, not yet below the low
    cdef uint8_t *eligible       # cache: up and not draining, not overloaded, effective > 0
    cdef uint8_t *excluded       # scratch for pick() and backups(), all zero between calls
    cdef int64_t share           # what one pick counts in the ledger (set_share); 1..MAX_SHARE
    cdef int64_t high_ppm
    cdef int64_t low_ppm
    cdef tuple watermarks        # as given, for state() and the properties
    cdef list node_ids           # slot -> node id
    cdef dict index              # node id -> slot
    cdef Py_ssize_t capped       # nodes with an assignment cap (then picks read the clock)
    cdef readonly object ledger  # where load and allowances are counted (core_ext.ledger)
    cdef unsigned char[::1] memory  # the ledger's mapping, held while we point into it
    cdef char *base              # its first byte
    cdef bint reports            # reports write the load into the ledger

    cdef int _reserve(self, Py_ssize_t needed) except -1
    cdef int _attach(self, object ledger) except -1
    cdef Py_ssize_t _slot(self, object node_id) except -1
    cdef void _reweigh(self, Py_ssize_t i) noexcept nogil
    cdef void _refresh(self, Py_ssize_t i) noexcept nogil
