"""The assignment cap, backups and the ledger that the workers of one dispatcher share.

Every test runs against both implementations. Two selectors on one shared ledger stand
for two worker processes in the unit tests; `test_processes_*` run real processes.
"""

import math
from collections import Counter

import pytest

from core_ext.errors import InvalidArgument, InvalidArgumentType
from core_ext.implementations import IMPLEMENTATIONS
from core_ext.ledger import Ledger, LedgerError
from tests.core.racing import race

SECOND = 1_000_000_000


@pytest.fixture
def shared(tmp_path):
    """Open handles on one ledger file: `shared(reports=...)`."""
    Ledger.create(tmp_path / "ledger")
    return lambda reports: Ledger.shared(tmp_path / "ledger", reports=reports)


# -- the assignment cap ---------------------------------------------------------------


def test_cap_allows_a_seconds_worth_then_one_per_interval(make):
    selector = make({"n1": 1})
    selector.set_rate("n1", 8.0)  # one every 0.125 s, eight at once
    assert [selector.pick(now=0) for _ in range(9)] == ["n1"] * 8 + [None]
    assert selector.pick(now=SECOND // 16) is None  # half a client's worth back
    assert selector.pick(now=SECOND // 8) == "n1"
    assert selector.pick(now=SECOND // 8) is None
    later = SECOND // 8 + SECOND
    assert [selector.pick(now=later) for _ in range(9)] == ["n1"] * 8 + [None]


def test_cap_below_one_a_second(make):
    selector = make({"n1": 1})
    selector.set_rate("n1", 0.5)  # one client every two seconds
    assert selector.pick(now=0) == "n1"
    assert selector.pick(now=SECOND) is None
    assert selector.pick(now=2 * SECOND) == "n1"


def test_a_capped_node_gives_its_turn_to_the_others(make):
    selector = make({"a": 5, "b": 1})
    selector.set_rate("a", 2.0)
    picks = [selector.pick(now=0) for _ in range(6)]
    assert picks.count("a") == 2 and picks.count("b") == 4


def test_no_rate_means_no_cap_and_a_changed_rate_starts_afresh(make):
    selector = make({"n1": 1})
    selector.set_rate("n1", 0.001)  # one client in 1000 s
    assert selector.pick(now=0) == "n1"
    selector.set_rate("n1", 0.001)  # the same rate again (every pacing tick): no change
    assert selector.pick(now=SECOND) is None
    selector.set_rate("n1", 1024.0)  # a reload raised it
    assert [selector.pick(now=5 * SECOND) for _ in range(1024)] == ["n1"] * 1024
    selector.set_rate("n1", None)
    assert all(selector.pick(now=5 * SECOND) == "n1" for _ in range(5000))


@pytest.mark.parametrize(("rate", "error"), [
    (0, InvalidArgument), (-1.0, InvalidArgument), (math.inf, InvalidArgument),
    (math.nan, InvalidArgument), ("5", InvalidArgumentType), (True, InvalidArgumentType),
])
def test_bad_rates_are_refused(make, rate, error):
    selector = make({"n1": 1})
    with pytest.raises(error, match="rate"):
        selector.set_rate("n1", rate)
    with pytest.raises(KeyError):
        selector.set_rate("ghost", 1.0)


# -- what a report leaves pending --------------------------------------------------------


def test_a_report_keeps_pending_what_it_cannot_have_seen(make):
    """A client has a whole poll interval to connect: the picks since the question before
    the last stay pending after a report, whatever the node's figure says."""
    selector = make({"a": 1})
    selector.report("a", connections=0, capacity=100)
    for _ in range(10):
        selector.pick()
    selector.sample()  # cycle 1 asks; these 10 may still be connecting
    for _ in range(5):
        selector.pick()  # after the question: not in the answer
    selector.report("a", connections=10, capacity=100)
    assert selector.node("a")["pending"] == 15
    selector.sample()  # cycle 2 asks: the first 10 had a whole interval
    selector.report("a", connections=15, capacity=100)
    assert selector.node("a")["pending"] == 5
    selector.settle("a", 20)  # a fresher figure than the recorded one: the same 5 pending
    assert sum(selector.pick() is not None for _ in range(100)) == 90 - 20 - 5
    selector.sample()
    selector.sample()
    selector.report("a", connections=90, capacity=100)
    assert selector.node("a")["pending"] == 0


def test_without_samples_a_report_clears_every_pick(make):
    selector = make({"a": 1})
    for _ in range(30):
        selector.pick()
    selector.report("a", connections=3, capacity=100)
    assert selector.node("a")["pending"] == 0
    selector.settle("a", 50)
    assert sum(selector.pick() is not None for _ in range(100)) == 40


# -- backups --------------------------------------------------------------------------


def test_backups_take_no_turn_and_count_nothing(make):
    selector = make({"a": 5, "b": 1, "c": 1})
    selector.report("a", connections=0, capacity=100)
    before = selector.state()
    assert selector.backups(2) == ["a", "b"]  # what the rotation would choose next
    assert selector.backups(5) == ["a", "b", "c"]
    assert selector.backups(2, exclude=("a",)) == ["b", "c"]
    assert selector.state() == before
    assert [selector.pick() for _ in range(7)] == list("aabacaa")


@pytest.mark.parametrize("count", [2, 3, 5])
def test_primaries_follow_the_weights_whatever_the_backups(make, count):
    selector = make({"a": 3, "b": 2, "c": 1})
    primaries = Counter()
    for _ in range(600):
        primary = selector.pick()
        primaries[primary] += 1
        backups = selector.backups(count - 1, exclude=(primary,))
        assert primary not in backups and len(set(backups)) == len(backups)
    assert primaries == {"a": 300, "b": 200, "c": 100}


def test_backups_skip_full_capped_and_excluded_nodes(make):
    selector = make({"a": 1, "b": 1, "c": 1, "d": 1})
    selector.report("a", connections=95, capacity=100)  # over the watermark
    selector.set_rate("b", 1.0)
    assert selector.pick(exclude=("c", "d"), now=0) == "b"  # b's one client this second
    assert selector.backups(4, exclude=("d",), now=0) == ["c"]
    assert selector.backups(0) == []
    with pytest.raises(InvalidArgument):
        selector.backups(-1)


# -- one ledger, several selectors ----------------------------------------------------


def test_two_selectors_on_one_ledger_share_the_watermark(Selector, shared):
    leader, follower = Selector(ledger=shared(True)), Selector(ledger=shared(False))
    for selector in (leader, follower):
        selector.add("n1", 1)
        selector.report("n1", connections=0, capacity=100)
    picks = 0
    while (leader if picks % 2 else follower).pick() is not None:
        picks += 1
    assert picks == 90  # ceil(0.9 * 100), not 90 for each
    assert leader.pick() is None and follower.node("n1")["pending"] == 90
    follower.report("n1", connections=50, capacity=100)  # applied from the log: no reset
    assert leader.node("n1")["pending"] == 90
    leader.report("n1", connections=50, capacity=100)  # the poller's report: picks are in it
    assert follower.node("n1")["pending"] == 0
    assert sum(follower.pick() is not None for _ in range(100)) == 40


def test_two_selectors_on_one_ledger_share_the_cap(Selector, shared):
    first, second = Selector(ledger=shared(True)), Selector(ledger=shared(False))
    for selector in (first, second):
        selector.add("n1", 1)
        selector.set_rate("n1", 10.0)
    taken = sum(s.pick(now=0) is not None for _ in range(20) for s in (first, second))
    assert taken == 10
    second.set_rate("n1", 10.0)  # the same rate from the other worker: no fresh allowance
    assert first.pick(now=0) is None


def test_slots_are_found_by_id_whatever_the_order_and_given_back(Selector, shared):
    one, two = Selector(ledger=shared(True)), Selector(ledger=shared(False))
    for nid in ("a", "b", "c"):
        one.add(nid, 1)
    for nid in ("c", "a"):
        two.add(nid, 1)
    one.report("c", connections=7, capacity=1000)
    assert two.pick(exclude=("a",)) == "c"
    assert one.node("c")["pending"] == 1
    one.remove("c")
    two.remove("c")  # nobody holds it: a new node may reuse the slot, starting empty
    one.add("c", 1)
    assert one.node("a")["pending"] == 0 and one.pick(exclude=("a", "b")) == "c"


def test_a_full_or_foreign_ledger_is_refused(Selector, tmp_path):
    selector = Selector(ledger=Ledger(slots=2))
    selector.add("a", 1)
    selector.add("b", 1)
    with pytest.raises(LedgerError, match="slots are all held"):
        selector.add("c", 1)
    assert selector.ids() == ["a", "b"]
    selector.remove("a")
    selector.add("c", 1)  # a released slot is reused
    (tmp_path / "other").write_bytes(b"not a ledger at all" * 10)
    with pytest.raises(LedgerError, match="not a ledger"):
        Ledger.shared(tmp_path / "other", reports=True)
    with pytest.raises(InvalidArgumentType, match="ledger"):
        Selector(ledger="shared")


def test_a_ledger_file_that_is_gone_is_an_error_never_a_new_ledger(tmp_path):
    """A worker counting on a ledger of its own would let every node overfill."""
    path = tmp_path / "ledger"
    Ledger.create(path)
    with pytest.raises(FileExistsError):
        Ledger.create(path)  # one per run, made by the supervisor
    shared = Ledger.shared(path, reports=True)
    path.unlink()  # a tmp cleaner, an operator
    with pytest.raises(LedgerError, match="is gone"):
        Ledger.shared(path, reports=False)
    assert not path.exists()
    shared.close()
    path.write_bytes(b"")
    with pytest.raises(LedgerError, match="not a ledger"):
        Ledger.shared(path, reports=False)


# -- real processes -------------------------------------------------------------------


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("processes", [2, 4])
def test_processes_never_push_a_node_past_its_watermark(tmp_path, processes, implementation):
    """Real processes race for the same nodes (the compiled core with atomics, the
    reference under the file lock): together they fill every node to exactly
    ceil(0.9 x capacity), never one more."""
    path = tmp_path / "ledger"
    Ledger.create(path)
    leader = IMPLEMENTATIONS[implementation](ledger=Ledger.shared(path, reports=True))
    for i in range(8):  # the leader's reports set the loads before anyone picks
        leader.add(f"n{i}", 1 + i % 3)
        leader.report(f"n{i}", connections=0, capacity=1000 + 100 * i)
    totals = race(_follower, (implementation, path), processes, timeout=60)
    assert leader.pick() is None
    assert totals == {f"n{i}": math.ceil(0.9 * (1000 + 100 * i)) for i in range(8)}


def _follower(implementation, path, ready, results):
    selector = IMPLEMENTATIONS[implementation](ledger=Ledger.shared(path, reports=False))
    for i in range(8):
        selector.add(f"n{i}", 1 + i % 3)
        selector.report(f"n{i}", connections=0, capacity=1000 + 100 * i)  # no reset
    ready.wait(timeout=60)
    taken = Counter()
    while (node := selector.pick()) is not None:
        taken[node] += 1
    results.put(dict(taken))


def test_a_selector_joining_held_slots_keeps_their_counts(Selector, shared):
    """A follower taking over as leader, or a selector rebuilt for new watermarks, joins
    slots others hold: the picks counted there since its state was taken are kept."""
    follower = Selector(ledger=shared(False))
    follower.add("n1", 1)
    follower.report("n1", connections=50, capacity=100)
    stale = follower.state()
    assert sum(follower.pick() is not None for _ in range(100)) == 90
    leader = Selector.from_state(stale, shared(True))  # says 50 connections, 0 pending
    assert leader.pick() is None and leader.node("n1")["pending"] == 40


def test_the_first_selector_on_a_slot_counts_from_its_own_figures(Selector, shared):
    """Followers may start before the leader: the first to hold a node starts its load
    from the replayed connections, not from nothing."""
    built = Selector()
    built.add("n1", 1)
    built.report("n1", connections=85, capacity=100)
    follower = Selector.from_state(built.state(), shared(False))
    assert [follower.pick() for _ in range(6)] == ["n1"] * 5 + [None]


def test_a_rebuild_does_not_latch_a_node_held_out_by_pending_picks(make):
    selector = make({"a": 1})
    selector.report("a", connections=85, capacity=100)
    assert [selector.pick() for _ in range(6)] == ["a"] * 5 + [None]
    rebuilt = type(selector).from_state(selector.state())
    assert rebuilt.pick() is None  # the five are still pending
    rebuilt.report("a", connections=86, capacity=100)  # four never came
    assert rebuilt.pick() == "a"
