"""Reported load: dynamic weights, pending picks, overload with hysteresis."""

from collections import Counter

import pytest


def test_unreported_node_has_its_static_weight(make):
    assert make({"a": 7}).node("a")["effective_weight"] == 7.0


@pytest.mark.parametrize(
    ("connections", "capacity", "effective"),
    [
        (0, 1000, 10.0),  # empty: full static weight
        (450, 1000, 5.0),  # halfway to the 0.9 threshold: half
        (600, 1000, 3.333),  # (0.9 - 0.6) / 0.9 = 1/3, fixed-point to 1/1000
        (899, 1000, 0.011),
        (900, 1000, 0.0),  # at the threshold: nothing
        (5000, 1000, 0.0),  # over capacity: nothing
    ],
)
def test_dynamic_weight_is_static_weight_times_headroom(make, connections, capacity, effective):
    selector = make({"a": 10}, high_watermark=0.9, low_watermark=0.8)
    selector.report("a", connections=connections, capacity=capacity)
    assert selector.node("a")["effective_weight"] == effective


def test_ramp_scales_the_weight_for_slow_start(make):
    selector = make({"new": 4, "old": 4})
    selector.set_ramp("new", 250)  # a quarter of its weight while starting
    assert selector.node("new")["effective_weight"] == 1.0
    assert Counter(selector.pick() for _ in range(50)) == {"old": 40, "new": 10}
    selector.report("new", connections=450, capacity=1000)  # half the headroom, a quarter
    assert selector.node("new")["effective_weight"] == 0.5
    selector.set_ramp("new", 0)
    assert not selector.node("new")["eligible"]
    selector.set_ramp("new", 1000)
    assert selector.node("new")["effective_weight"] == 2.0


@pytest.mark.parametrize(("value", "error"), [(1001, ValueError), (-1, ValueError),
                                              (0.5, TypeError), (True, TypeError)])
def test_bad_ramp(make, value, error):
    selector = make({"a": 1})
    with pytest.raises(error, match="ramp must be"):
        selector.set_ramp("a", value)
    assert selector.node("a")["ramp"] == 1000


def test_set_weight_rescales_by_the_last_report(make):
    selector = make({"a": 10})
    selector.report("a", connections=450, capacity=1000)
    selector.set_weight("a", 4)
    assert selector.node("a")["effective_weight"] == 2.0


def test_node_with_more_headroom_gets_proportionally_more_clients(make):
    selector = make({"busy": 2, "idle": 2}, high_watermark=1.0, low_watermark=1.0)
    selector.report("busy", connections=75_000, capacity=100_000)  # headroom 0.25
    selector.report("idle", connections=25_000, capacity=100_000)  # headroom 0.75
    counts = Counter(selector.pick() for _ in range(400))
    assert counts == {"idle": 300, "busy": 100}


def test_pick_does_not_change_dynamic_weight(make):
    selector = make({"a": 3, "b": 1})
    selector.report("a", connections=10, capacity=100)
    weight = selector.node("a")["effective_weight"]
    for _ in range(20):
        selector.pick()
    assert selector.node("a")["effective_weight"] == weight


def test_pending_picks_stop_a_node_at_its_high_watermark(make):
    selector = make({"a": 1}, high_watermark=0.9, low_watermark=0.5)
    selector.report("a", connections=85, capacity=100)
    got = [selector.pick() for _ in range(10)]
    # 85 + 5 pending = 90 = 0.9 * 100: the fifth pick reaches the threshold, no sixth.
    assert got == ["a"] * 5 + [None] * 5
    assert selector.node("a")["overloaded"] is True
    assert selector.node("a")["pending"] == 5


def test_pending_picks_hold_a_node_out_only_until_the_next_report(make):
    """Picks whose clients never came (or are still connecting when a fresh count says
    so) must not keep a node out below its watermark: only a reported figure latches."""
    selector = make({"a": 1}, high_watermark=0.9, low_watermark=0.5)
    selector.report("a", connections=85, capacity=100)
    assert [selector.pick() for _ in range(6)] == ["a"] * 5 + [None]
    selector.report("a", connections=86, capacity=100)  # four of the five never came
    assert not selector.node("a")["overloaded"]
    assert [selector.pick() for _ in range(5)] == ["a"] * 4 + [None]
    selector.report("a", connections=90, capacity=100)  # reported at the mark: latched
    selector.report("a", connections=86, capacity=100)
    assert selector.node("a")["overloaded"] and selector.pick() is None


def test_burst_goes_to_other_nodes_once_one_is_full(make):
    selector = make({"small": 10, "big": 1}, high_watermark=0.9, low_watermark=0.8)
    selector.report("small", connections=0, capacity=10)
    selector.report("big", connections=0, capacity=1000)
    counts = Counter(selector.pick() for _ in range(100))
    assert counts["small"] == 9  # never past 0.9 * 10, however heavy its weight
    assert counts["big"] == 91


def test_overload_hysteresis(make):
    selector = make({"a": 1, "b": 1}, high_watermark=0.9, low_watermark=0.8)
    selector.report("a", connections=95, capacity=100)
    assert selector.node("a")["overloaded"] and not selector.node("a")["eligible"]
    assert {selector.pick() for _ in range(10)} == {"b"}
    selector.report("a", connections=85, capacity=100)  # below high, not below low
    assert selector.node("a")["overloaded"]
    selector.report("a", connections=79, capacity=100)
    assert not selector.node("a")["overloaded"]
    assert "a" in {selector.pick() for _ in range(10)}
    selector.report("a", connections=85, capacity=100)  # between marks: stays available
    assert not selector.node("a")["overloaded"]


def test_report_resets_pending(make):
    selector = make({"a": 1})
    for _ in range(5):
        selector.pick()
    selector.report("a", connections=5, capacity=100)
    assert selector.node("a")["pending"] == 0
    assert selector.node("a")["connections"] == 5


def test_all_nodes_overloaded_gives_none(make):
    selector = make({"a": 1, "b": 2})
    for nid in ("a", "b"):
        selector.report(nid, connections=100, capacity=100)
    assert selector.pick() is None


def test_equal_watermarks_mean_no_hysteresis(make):
    selector = make({"a": 1}, high_watermark=0.5, low_watermark=0.5)
    selector.report("a", connections=50, capacity=100)
    assert selector.node("a")["overloaded"]
    selector.report("a", connections=49, capacity=100)
    assert not selector.node("a")["overloaded"]


def test_overloaded_node_that_goes_down_and_up_stays_overloaded(make):
    selector = make({"a": 1})
    selector.report("a", connections=100, capacity=100)
    selector.set_up("a", False)
    selector.set_up("a", True)
    assert selector.pick() is None
