"""When a cluster member that does not poll may count its picks afresh from the leader's
cycle (pure logic: the lease's values as read, and this member's own clock)."""

import pytest

from dispatcher.cluster.cycles import MARGIN, HeardCycles


def value(cycle, seq=5, asked_ago=0.3, leader="a-1", **extra):
    return {"leader": leader, "cycle": cycle, "seq": seq, "asked_ago": asked_ago,
            "figures": {"n1": 7}, **extra}


def test_a_cycle_is_due_once_the_state_holds_its_events_and_only_once():
    heard = HeardCycles()
    heard.read(value(1, seq=5), revision=10, sent_at=100.0)
    assert heard.due(4) is None
    cycle = heard.due(5)
    assert cycle.seq == 5 and cycle.figures == {"n1": 7}
    assert heard.due(9) is None
    heard.read(value(1, seq=5), revision=10, sent_at=100.25)  # the same value again
    assert heard.due(9) is None


def test_the_question_is_bounded_by_the_read_that_saw_the_value_before():
    heard = HeardCycles()
    heard.read(value(1), revision=10, sent_at=100.0)
    heard.due(5)
    heard.read(value(1), revision=10, sent_at=100.25)  # later reads of the old value
    heard.read(value(2, asked_ago=0.4), revision=11, sent_at=100.5)
    cycle = heard.due(5)
    assert cycle.asked_after == pytest.approx(100.25 - 0.4 - MARGIN)
    heard.sampled_at = cycle.asked_after + 0.01  # sampled after the leader may have asked
    assert not heard.may_settle(cycle)
    heard.sampled_at = cycle.asked_after - 0.01
    assert heard.may_settle(cycle)


def test_the_first_cycle_heard_settles_only_a_member_that_never_sampled():
    heard = HeardCycles()
    heard.read(value(1), revision=3, sent_at=50.0)
    cycle = heard.due(5)
    assert cycle.asked_after == float("-inf")
    assert heard.may_settle(cycle)
    heard.sampled_at = 49.0
    assert not heard.may_settle(cycle)


@pytest.mark.parametrize("bad", [
    {"leader": "a", "cycle": 1, "seq": "x"},
    {"leader": "a", "cycle": 1, "seq": 2, "figures": ["n1"]},
    {"leader": "a", "cycle": 1, "seq": 2, "asked_ago": "soon"},
    {"leader": "a", "cycle": None, "seq": 2},
])
def test_a_value_this_build_did_not_write_is_no_cycle(bad):
    heard = HeardCycles()
    heard.read(bad, revision=1, sent_at=1.0)
    assert heard.due(10**9) is None


def test_a_new_leader_with_the_same_cycle_number_is_a_new_cycle():
    heard = HeardCycles()
    heard.read(value(1, leader="a-1"), revision=1, sent_at=1.0)
    assert heard.due(5) is not None
    heard.read(value(1, leader="b-2"), revision=2, sent_at=2.0)
    assert heard.due(5) is not None
