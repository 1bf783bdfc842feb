# cython: language_level=3
"""The compiled selection core: `core_ext.reference` with C arrays.

The reference module's docstring is the specification; this file implements the same
rules, the same integer arithmetic and the same errors, and keeps Python objects out of
the pick loop.
"""

from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcpy, memmove, memset

from core_ext._atomic cimport ledger_add, ledger_get, ledger_set, ledger_swap, monotonic_ns

from core_ext import _rules, _snapshot, ledger as _ledger
from core_ext._rules import MAX_LOAD as _MAX_LOAD_PY
from core_ext._rules import MAX_COUNT as _MAX_COUNT_PY
from core_ext._rules import PPM as _PPM_PY
from core_ext._rules import RAMP_FULL as _RAMP_FULL_PY
from core_ext._rules import WEIGHT_SCALE as _WEIGHT_SCALE_PY

# One source of truth for the constants: read once from the shared rules module.
cdef int64_t MAX_COUNT = _MAX_COUNT_PY
cdef int64_t PPM = _PPM_PY
cdef int64_t WEIGHT_SCALE = _WEIGHT_SCALE_PY
cdef int64_t RAMP_FULL = _RAMP_FULL_PY
cdef int64_t MAX_LOAD = _MAX_LOAD_PY
cdef Py_ssize_t LOAD = _ledger.LOAD
cdef Py_ssize_t DUE = _ledger.DUE
cdef Py_ssize_t INTERVAL = _ledger.INTERVAL
cdef Py_ssize_t PICKS = _ledger.PICKS
cdef Py_ssize_t ASKED = _ledger.ASKED
cdef Py_ssize_t MARK = _ledger.MARK
# bits of the `excluded` scratch array
cdef uint8_t EXCLUDED = 1     # named by the caller
cdef uint8_t UNAVAILABLE = 2  # over the watermark by the shared load, or capped for now
cdef uint8_t CHOSEN = 4       # already named as a backup

cdef object _check_id = _rules.node_id
cdef object _check_weight = _rules.weight
cdef object _check_count = _rules.count
cdef object _check_flag = _rules.flag
cdef object _check_ramp = _rules.ramp
cdef object _check_exclusion = _rules.exclusion
cdef object _check_rate = _rules.rate
cdef object _check_backups = _rules.backup_count
cdef object _check_share = _rules.share
cdef object _check_ledger = _rules.ledger
cdef object _Ledger = _ledger.Ledger
cdef object _unknown_node = _rules.unknown_node
cdef object _duplicate_node = _rules.duplicate_node


cdef object _lookup(dict index, object node_id):
    try:
        return index.get(node_id)
    except TypeError:  # unhashable: certainly not a node id
        return None


cdef inline int64_t _count(object nid, str name, object value, int64_t minimum) except? -1:
    # report() runs for every poll of every node and every replayed load event: accept a
    # valid figure in C; anything else goes to the shared check, which raises its error.
    cdef int64_t number
    if type(value) is int and -MAX_COUNT <= value <= MAX_COUNT:
        number = value
        if minimum <= number:
            return number
    return _check_count(nid, name, value, minimum)


cdef void *_resized(void *ptr, Py_ssize_t count, size_t item) except NULL:
    cdef void *grown = PyMem_Realloc(ptr, <size_t>count * item)
    if grown == NULL:
        raise MemoryError()
    return grown


cdef inline int64_t *_field(Selector self, Py_ssize_t i, Py_ssize_t field) noexcept nogil:
    return <int64_t *>(self.base + self.cell[i] + field)

cdef inline bint _available(Selector self, Py_ssize_t i, int64_t now, bint peek) noexcept nogil:
    # Below the high watermark by the load every process counts, and within the cap.
    # A node found over the watermark is overloaded from now on (unless peeking).
    if self.capacity[i] and (
        ledger_get(_field(self, i, LOAD)) * PPM >= self.high_ppm * self.capacity[i]
    ):
        if not peek:
            self.overloaded[i] = 1
            self.eligible[i] = 0
        return False
    return not self.interval[i] or (
        ledger_get(_field(self, i, DUE)) - self.tolerance[i] <= now
    )

cdef bint _take(Selector self, Py_ssize_t i, int64_t now) noexcept nogil:
    # Count one client for node i (`share` in the ledger): the load check and the count
    # are one atomic step, then the allowance; False (and nothing counted) if another
    # process got there first.
    cdef int64_t *load = _field(self, i, LOAD)
    cdef int64_t *due = _field(self, i, DUE)
    cdef int64_t *picks = _field(self, i, PICKS)
    cdef int64_t share = self.share
    cdef int64_t seen, after, counted, limit = self.high_ppm * self.capacity[i]
    ledger_add(picks, share)  # first, so a report meanwhile counts it pending (see _settle)
    while True:
        seen = ledger_get(load)
        if self.capacity[i] and seen * PPM >= limit:
            ledger_add(picks, -share)
            self.overloaded[i] = 1
            self.eligible[i] = 0
            return False
        after = seen + share
        if after > MAX_LOAD:  # the count stops at MAX_LOAD (and never goes down here)
            after = seen if seen > MAX_LOAD else MAX_LOAD
        if ledger_swap(load, seen, after):
            break
    counted = after - seen
    while self.interval[i]:
        seen = ledger_get(due)
        if seen - self.tolerance[i] > now:
            if counted:
                ledger_add(load, -counted)  # give the count back
            ledger_add(picks, -share)
            return False
        if ledger_swap(due, seen, (seen if seen > now else now) + self.interval[i]):
            break
    if self.capacity[i] and after * PPM >= limit:
        self.overloaded[i] = 1
        self.eligible[i] = 0
    return True


cdef bint _exclude(Selector self, object exclude, object now, int64_t *clock) except -1:
    # Mark the caller's exclusions in the scratch array (True if any) and read the clock
    # if a cap needs it. The exclusions become slots before any array is touched:
    # iterating `exclude` runs arbitrary Python code, which may even add or remove nodes.
    cdef list slots = None
    if exclude:
        index = self.index
        slots = [index.get(node_id) for node_id in _check_exclusion(exclude)]
    if self.capped:
        clock[0] = monotonic_ns() if now is None else now
    cdef bint marked = False
    if slots:
        for slot in slots:
            if slot is not None:
                self.excluded[<Py_ssize_t>slot] = EXCLUDED
                marked = True
    return marked


cdef void _settle(Selector self, Py_ssize_t i, int64_t connections) noexcept nogil:
    # The ledger's load from a reported figure: picks since the sample before the last
    # stay pending (all are in the figure until there were two samples). A pick counts itself in `picks`
    # before it swaps `load`, so this swap loop never loses one.
    if not self.reports:
        return
    cdef int64_t *load = _field(self, i, LOAD)
    cdef int64_t mark = ledger_get(_field(self, i, MARK))
    cdef int64_t seen, since, after
    while True:
        seen = ledger_get(load)
        since = 0
        if mark >= 0:
            since = ledger_get(_field(self, i, PICKS)) - mark
            if since < 0:
                since = 0
        after = connections + since
        if after > MAX_LOAD:
            after = MAX_LOAD
        if ledger_swap(load, seen, after):
            return


cdef class Selector:
    """Chooses one node per new client; see `core_ext.reference` for the rules."""

    def __cinit__(self, *args, **kwargs):
        # Valid defaults even if __init__ is never run (Selector.__new__, a subclass that
        # skips it): a zero high_ppm would divide by zero in C.
        self.high_ppm, self.low_ppm = _rules.watermarks(0.9, 0.8)
        self.watermarks = (0.9, 0.8)
        self.share = 1
        self.n = 0
        self.allocated = 0
        self.node_ids = []
        self.index = {}
        self.capped = 0

    def __init__(self, high_watermark=0.9, low_watermark=0.8, ledger=None):
        self.high_ppm, self.low_ppm = _rules.watermarks(high_watermark, low_watermark)
        self.watermarks = (high_watermark, low_watermark)
        self._attach(_check_ledger(ledger) if ledger is not None else _Ledger())
        self.share = 1
        self.n = 0  # a second __init__ starts empty, as the reference does
        self.node_ids = []
        self.index = {}
        self.capped = 0

    def __dealloc__(self):
        PyMem_Free(self.weight)
        PyMem_Free(self.effective)
        PyMem_Free(self.current)
        PyMem_Free(self.connections)
        PyMem_Free(self.capacity)
        PyMem_Free(self.cell)
        PyMem_Free(self.interval)
        PyMem_Free(self.tolerance)
        PyMem_Free(self.shadow)
        PyMem_Free(self.ramp)
        PyMem_Free(self.up)
        PyMem_Free(self.draining)
        PyMem_Free(self.overloaded)
        PyMem_Free(self.latched)
        PyMem_Free(self.eligible)
        PyMem_Free(self.excluded)

    # -- membership -------------------------------------------------------------------

    def add(self, node_id, weight=1):
        """Add a node, up, with no load reported; weight 0 means it is never picked."""
        nid = _check_id(node_id)
        if nid in self.index:
            raise _duplicate_node(nid)
        cdef int64_t w = _check_weight(nid, weight)
        if self.base == NULL:  # __init__ never ran
            self._attach(_Ledger())
        self._reserve(self.n + 1)
        cdef Py_ssize_t cell = self.ledger.claim(nid)
        cdef Py_ssize_t i = self.n
        self.weight[i] = w
        self.current[i] = 0
        self.connections[i] = 0
        self.capacity[i] = 0
        self.cell[i] = cell
        self.interval[i] = 0
        self.tolerance[i] = 0
        self.ramp[i] = RAMP_FULL
        self.up[i] = 1
        self.draining[i] = 0
        self.overloaded[i] = 0
        self.latched[i] = 0
        self.excluded[i] = 0
        self._reweigh(i)
        self.node_ids.append(nid)
        self.index[nid] = i
        self.n += 1

    def remove(self, node_id):
        cdef Py_ssize_t i = self._slot(node_id)
        cdef Py_ssize_t tail = self.n - i - 1
        cdef Py_ssize_t cell = self.cell[i]
        if self.interval[i]:
            self.capped -= 1
        if tail:
            # Close the gap so slots stay dense and in insertion order.
            memmove(&self.weight[i], &self.weight[i + 1], tail * sizeof(int64_t))
            memmove(&self.effective[i], &self.effective[i + 1], tail * sizeof(int64_t))
            memmove(&self.current[i], &self.current[i + 1], tail * sizeof(int64_t))
            memmove(&self.connections[i], &self.connections[i + 1], tail * sizeof(int64_t))
            memmove(&self.capacity[i], &self.capacity[i + 1], tail * sizeof(int64_t))
            memmove(&self.cell[i], &self.cell[i + 1], tail * sizeof(Py_ssize_t))
            memmove(&self.interval[i], &self.interval[i + 1], tail * sizeof(int64_t))
            memmove(&self.tolerance[i], &self.tolerance[i + 1], tail * sizeof(int64_t))
            memmove(&self.ramp[i], &self.ramp[i + 1], tail * sizeof(int64_t))
            memmove(&self.up[i], &self.up[i + 1], tail)
            memmove(&self.draining[i], &self.draining[i + 1], tail)
            memmove(&self.overloaded[i], &self.overloaded[i + 1], tail)
            memmove(&self.latched[i], &self.latched[i + 1], tail)
            memmove(&self.eligible[i], &self.eligible[i + 1], tail)
        del self.index[self.node_ids.pop(i)]
        self.n -= 1
        cdef Py_ssize_t j
        for j in range(i, self.n):
            self.index[self.node_ids[j]] = j
        self.ledger.release(cell)

    def close(self):
        """Release every node's ledger slot (a selector replaced by another)."""
        cdef Py_ssize_t i
        for i in range(self.n):
            self.ledger.release(self.cell[i])
        self.n = 0
        self.capped = 0
        self.node_ids = []
        self.index = {}

    def __len__(self):
        return self.n

    def __contains__(self, node_id):
        return node_id in self.index

    def ids(self):
        """Node ids in the order they were added."""
        return list(self.node_ids)

    # -- inputs -----------------------------------------------------------------------

    def set_weight(self, node_id, weight):
        cdef Py_ssize_t i = self._slot(node_id)
        self.weight[i] = _check_weight(self.node_ids[i], weight)
        self._reweigh(i)

    def set_up(self, node_id, up):
        cdef Py_ssize_t i = self._slot(node_id)
        self.up[i] = _check_flag(self.node_ids[i], "up", up)
        self._refresh(i)

    def set_draining(self, node_id, draining):
        cdef Py_ssize_t i = self._slot(node_id)
        self.draining[i] = _check_flag(self.node_ids[i], "draining", draining)
        self._refresh(i)

    def set_ramp(self, node_id, ramp):
        """Scale the node's weight by ramp/1000 (slow start); 1000 is its full weight."""
        cdef Py_ssize_t i = self._slot(node_id)
        self.ramp[i] = _check_ramp(self.node_ids[i], ramp)
        self._reweigh(i)

    def report(self, node_id, connections, capacity):
        """Take a pulled load figure: clears the pending picks made before the sample
        before the last (all of them without samples), recomputes weight and overload."""
        cdef Py_ssize_t i = self._slot(node_id)
        nid = self.node_ids[i]
        cdef int64_t conns = _count(nid, "connections", connections, 0)
        cdef int64_t cap = _count(nid, "capacity", capacity, 1)
        self.connections[i] = conns
        self.capacity[i] = cap
        _settle(self, i, conns)
        if conns * PPM >= self.high_ppm * cap:
            self.latched[i] = 1
        elif conns * PPM < self.low_ppm * cap:
            self.latched[i] = 0
        # Pending picks stop a node only until the next report, which judges afresh (the
        # next pick checks the load again): a count of clients still connecting must not
        # hold it out below its watermark.
        self.overloaded[i] = self.latched[i]
        self._reweigh(i)

    def sample(self):
        """The nodes are being asked for their load now: the reports that follow leave
        pending the clients picked since the question before this one (those picked since
        cannot be in the answers, and those picked just before may still be connecting)."""
        cdef Py_ssize_t i
        for i in range(self.n):
            ledger_set(_field(self, i, MARK), ledger_get(_field(self, i, ASKED)))
            ledger_set(_field(self, i, ASKED), ledger_get(_field(self, i, PICKS)))

    def settle(self, node_id, connections):
        """Count the node's load afresh from `connections`, as `report()` does, without
        changing its weight or overload state (a fresher figure than the last report)."""
        cdef Py_ssize_t i = self._slot(node_id)
        _settle(self, i, _count(self.node_ids[i], "connections", connections, 0))

    def set_rate(self, node_id, per_second):
        """Cap the clients a second this node takes (None: no cap). A changed rate starts
        with a full allowance, once for every process sharing the ledger."""
        cdef Py_ssize_t i = self._slot(node_id)
        interval, tolerance = _check_rate(self.node_ids[i], per_second)
        self.capped += (interval != 0) - (self.interval[i] != 0)
        self.interval[i] = interval
        self.tolerance[i] = tolerance
        cdef int64_t *shared = _field(self, i, INTERVAL)
        cdef int64_t before = ledger_get(shared)
        if before != interval and ledger_swap(shared, before, interval):
            ledger_set(_field(self, i, DUE), 0)

    def set_share(self, members):
        """Take 1/`members` of every node's headroom: each pick counts `members` in the
        ledger (see `core_ext.reference.Selector.set_share`)."""
        self.share = _check_share(members)

    @property
    def share(self):
        """What one pick counts in the ledger (`set_share`)."""
        return self.share

    # -- the choice -------------------------------------------------------------------

    def pick(self, exclude=(), now=None):
        """Return the id of the node the next client should use, or None if none can.

        `now` is CLOCK_MONOTONIC in nanoseconds (`time.monotonic_ns()`, the default), the
        clock of the assignment caps."""
        cdef int64_t clock = 0
        cdef bint marked = _exclude(self, exclude, now, &clock)
        cdef Py_ssize_t i, best, n = self.n
        cdef int64_t total, weight, best_weight
        cdef int64_t *effective = self.effective
        cdef int64_t *current = self.current
        cdef uint8_t *eligible = self.eligible
        cdef uint8_t *excluded = self.excluded
        # No `with nogil`: releasing the GIL costs more than the whole loop at usual sizes.
        while True:
            best = -1
            total = 0
            best_weight = 0
            for i in range(n):
                if eligible[i] and not excluded[i]:
                    if not _available(self, i, clock, False):
                        excluded[i] = UNAVAILABLE
                        marked = True
                        continue
                    weight = current[i] + effective[i]
                    current[i] = weight
                    total += effective[i]
                    if best < 0 or weight > best_weight:
                        best = i
                        best_weight = weight
            if best < 0:
                break
            current[best] -= total
            if _take(self, best, clock):
                break
            # Another process took the node's last place or allowance between the check
            # and the count: undo this round's turn (best's too: _take made it ineligible)
            # and choose again without it.
            current[best] += total
            for i in range(n):
                if i == best or (eligible[i] and not excluded[i]):
                    current[i] -= effective[i]
            excluded[best] = UNAVAILABLE
            marked = True
        if marked:
            memset(excluded, 0, n)
        if best < 0:
            return None
        return self.node_ids[best]

    def backups(self, count, exclude=(), now=None):
        """Up to `count` distinct nodes the rotation would choose next, none of them in
        `exclude`: a client's fallbacks. Nothing changes: no turn is taken, no pick is
        counted, no allowance is spent."""
        cdef Py_ssize_t wanted = _check_backups(count)
        cdef int64_t clock = 0
        _exclude(self, exclude, now, &clock)
        cdef Py_ssize_t i, best, n = self.n
        cdef int64_t total, best_weight
        cdef int64_t *shadow = self.shadow
        cdef uint8_t *excluded = self.excluded
        cdef list chosen = []
        memcpy(shadow, self.current, n * sizeof(int64_t))
        for i in range(n):
            if not excluded[i] and not (self.eligible[i] and _available(self, i, clock, True)):
                excluded[i] = UNAVAILABLE
        while len(chosen) < wanted:
            best = -1
            total = 0
            best_weight = 0
            for i in range(n):
                if not excluded[i]:
                    shadow[i] += self.effective[i]
                    total += self.effective[i]
                    if best < 0 or shadow[i] > best_weight:
                        best = i
                        best_weight = shadow[i]
            if best < 0:
                break
            shadow[best] -= total
            excluded[best] = CHOSEN
            chosen.append(self.node_ids[best])
        memset(excluded, 0, n)
        return chosen

    # -- state ------------------------------------------------------------------------

    def node(self, node_id):
        """A snapshot of one node's routing fields (see `_snapshot.node_view`)."""
        cdef Py_ssize_t i = self._slot(node_id)
        reported = self.capacity[i] > 0
        return _snapshot.node_view(
            self.node_ids[i], self.weight[i], self.effective[i], self.current[i],
            bool(self.up[i]), bool(self.draining[i]), bool(self.overloaded[i]),
            bool(self.eligible[i]),
            self.connections[i] if reported else None,
            self.capacity[i] if reported else None,
            min(MAX_COUNT, max(0, ledger_get(_field(self, i, LOAD)) - self.connections[i])),
            self.ramp[i],
        )

    def state(self):
        """Everything needed to continue exactly where this selector is (plain data)."""
        cdef Py_ssize_t i
        views = []
        for i in range(self.n):  # the reported latch: a pending-picks block is in the load
            views.append({**self.node(self.node_ids[i]), "overloaded": bool(self.latched[i])})
        return _snapshot.dump(*self.watermarks, views, self.share)

    @classmethod
    def from_state(cls, state, ledger=None):
        """The inverse of `state()`: a selector whose next picks are this one's. On a
        ledger where another selector already holds a node, the load counted there is
        kept: it has every pick since, which this state cannot know."""
        high, low, share, rows = _snapshot.parse(state)
        cdef Selector selector = cls(high, low, ledger)
        selector.share = share
        cdef Py_ssize_t i
        for nid, weight, current, up, draining, overloaded, conns, cap, pending, ramp in rows:
            fresh = not selector.ledger.holds(nid)
            Selector.add(selector, nid, weight)  # not an override that may add elsewhere
            i = selector.index[nid]
            selector.current[i] = current
            selector.up[i] = up
            selector.draining[i] = draining
            selector.overloaded[i] = overloaded
            selector.latched[i] = overloaded
            selector.connections[i] = conns or 0
            selector.capacity[i] = cap or 0
            if fresh:
                ledger_set(_field(selector, i, LOAD), (conns or 0) + pending)
            selector.ramp[i] = ramp
            selector._reweigh(i)
        return selector

    def __reduce__(self):
        # C arrays cannot be pickled as they are; the portable state can.
        return type(self).from_state, (self.state(),)

    @property
    def high_watermark(self):
        return self.watermarks[0]

    @property
    def low_watermark(self):
        return self.watermarks[1]

    def __repr__(self):
        return (
            f"<{type(self).__module__}.Selector nodes={self.n} "
            f"high_watermark={self.watermarks[0]} low_watermark={self.watermarks[1]}>"
        )

    # -- internals --------------------------------------------------------------------

    cdef int _reserve(self, Py_ssize_t needed) except -1:
        if needed <= self.allocated:
            return 0
        cdef Py_ssize_t size = max(8, self.allocated * 2, needed)
        self.weight = <int64_t *>_resized(self.weight, size, sizeof(int64_t))
        self.effective = <int64_t *>_resized(self.effective, size, sizeof(int64_t))
        self.current = <int64_t *>_resized(self.current, size, sizeof(int64_t))
        self.connections = <int64_t *>_resized(self.connections, size, sizeof(int64_t))
        self.capacity = <int64_t *>_resized(self.capacity, size, sizeof(int64_t))
        self.cell = <Py_ssize_t *>_resized(self.cell, size, sizeof(Py_ssize_t))
        self.interval = <int64_t *>_resized(self.interval, size, sizeof(int64_t))
        self.tolerance = <int64_t *>_resized(self.tolerance, size, sizeof(int64_t))
        self.shadow = <int64_t *>_resized(self.shadow, size, sizeof(int64_t))
        self.ramp = <int64_t *>_resized(self.ramp, size, sizeof(int64_t))
        self.up = <uint8_t *>_resized(self.up, size, 1)
        self.draining = <uint8_t *>_resized(self.draining, size, 1)
        self.overloaded = <uint8_t *>_resized(self.overloaded, size, 1)
        self.latched = <uint8_t *>_resized(self.latched, size, 1)
        self.eligible = <uint8_t *>_resized(self.eligible, size, 1)
        self.excluded = <uint8_t *>_resized(self.excluded, size, 1)
        memset(&self.excluded[self.allocated], 0, <size_t>(size - self.allocated))
        self.allocated = size
        return 0

    cdef int _attach(self, object ledger) except -1:
        self.memory = ledger.memory
        self.base = <char *>&self.memory[0]
        self.ledger = ledger
        self.reports = ledger.reports
        return 0

    cdef Py_ssize_t _slot(self, object node_id) except -1:
        slot = _lookup(self.index, node_id)
        if slot is None:
            raise _unknown_node(node_id)
        return slot

    cdef void _reweigh(self, Py_ssize_t i) noexcept nogil:
        cdef int64_t utilisation, headroom, effective
        if self.capacity[i] == 0:
            effective = self.weight[i] * WEIGHT_SCALE
        else:
            utilisation = self.connections[i] * PPM // self.capacity[i]
            headroom = self.high_ppm - utilisation
            if headroom < 0:
                headroom = 0
            effective = self.weight[i] * WEIGHT_SCALE * headroom // self.high_ppm
        self.effective[i] = effective * self.ramp[i] // RAMP_FULL
        self._refresh(i)

    cdef void _refresh(self, Py_ssize_t i) noexcept nogil:
        self.eligible[i] = (
            self.up[i] and not self.draining[i] and not self.overloaded[i]
            and self.effective[i] > 0
        )
