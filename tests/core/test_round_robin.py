"""Smooth weighted round-robin: nginx's order, exact shares, eligibility, stable state."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def picks(selector, count, **kwargs):
    return [selector.pick(**kwargs) for _ in range(count)]


def test_nginx_example_order(make):
    assert picks(make({"a": 5, "b": 1, "c": 1}), 14) == list("aabacaa") * 2


def test_equal_weights_rotate_in_insertion_order(make):
    assert picks(make({"x": 1, "b": 1, "a": 1}), 6) == ["x", "b", "a"] * 2


def test_tie_goes_to_the_node_added_first(make):
    # After one round both have current weight 0 again; the first added wins each tie.
    assert picks(make({"b": 2, "a": 2}), 4) == ["b", "a", "b", "a"]


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(0, 12), min_size=1, max_size=8), start=st.integers(0, 40))
def test_every_window_of_sum_weights_picks_each_node_weight_times(make, weights, start):
    selector = make({f"n{i}": w for i, w in enumerate(weights)})
    total = sum(weights)
    if total == 0:
        assert selector.pick() is None
        return
    picks(selector, start)
    counts = Counter(picks(selector, total))
    assert counts == Counter({f"n{i}": w for i, w in enumerate(weights) if w})


def test_weight_zero_is_never_picked(make):
    selector = make({"z": 0, "a": 1, "b": 3})
    assert "z" not in picks(selector, 100)
    selector.set_weight("a", 0)
    selector.set_weight("b", 0)
    assert selector.pick() is None


def test_weight_set_to_zero_with_positive_current_weight_is_not_picked(make):
    selector = make({"a": 1, "b": 9})
    selector.pick()  # b now has a negative, a a positive current weight
    assert selector.node("a")["current_weight"] > 0
    selector.set_weight("a", 0)
    assert set(picks(selector, 20)) == {"b"}


def test_empty_selector_picks_none(make):
    assert make().pick() is None


def test_down_and_draining_nodes_are_skipped_until_restored(make):
    selector = make({"a": 1, "b": 1, "c": 1})
    selector.set_up("a", False)
    selector.set_draining("b", True)
    assert set(picks(selector, 9)) == {"c"}
    selector.set_up("a", True)
    selector.set_draining("b", False)
    assert set(picks(selector, 9)) == {"a", "b", "c"}


def test_exclude_skips_listed_nodes_and_ignores_unknown_ones(make):
    selector = make({"a": 5, "b": 1, "c": 1})
    assert set(picks(selector, 20, exclude=("a", "ghost"))) == {"b", "c"}
    assert selector.pick(exclude=["a", "b", "c"]) is None
    assert selector.pick(exclude=frozenset({"b"})) in {"a", "c"}


def test_exclude_leaves_no_trace_on_later_picks(make):
    selector = make({"a": 1, "b": 1, "c": 1})
    assert selector.pick(exclude=("a", "b")) == "c"
    assert set(picks(selector, 6)) == {"a", "b", "c"}


def test_failed_exclude_changes_nothing(make):
    selector, plain = make({"a": 1, "b": 1}), make({"a": 1, "b": 1})
    with pytest.raises(TypeError):
        selector.pick(exclude=["a", ["unhashable"]])
    assert picks(selector, 6) == picks(plain, 6) == ["a", "b"] * 3


def test_exclude_that_changes_the_selector_while_iterated(make):
    selector = make({f"n{i}": 1 for i in range(8)})

    def exclusions():
        for i in range(8, 40):  # grows the arrays while pick() reads the exclusions
            selector.add(f"n{i}", 1)
        selector.remove("n3")
        yield "n0"

    assert selector.pick(exclude=exclusions()) == "n1"
    assert len(selector) == 39 and "n3" not in selector


def test_from_state_does_not_rely_on_an_overridable_add(make, Selector):
    class NoAdd(Selector):
        def add(self, node_id, weight=1):
            pass

    restored = NoAdd.from_state(make({"a": 2, "b": 1}).state())
    assert restored.ids() == ["a", "b"] and restored.pick() == "a"


def test_compiled_instance_without_init_is_memory_safe():
    # A C type must stay safe whatever Python code does with it; the reference, like any
    # Python class, just lacks its attributes.
    from core_ext._selector import Selector

    bare = Selector.__new__(Selector)
    bare.add("a", 2)
    bare.report("a", connections=1, capacity=10)  # divides by the default high watermark
    assert bare.pick() == "a" and bare.high_watermark == 0.9


def test_second_init_starts_empty(make):
    selector = make({"a": 1})
    selector.__init__(0.5, 0.5)
    assert len(selector) == 0 and selector.high_watermark == 0.5


def test_exclude_skipped_node_keeps_its_current_weight(make):
    selector = make({"a": 1, "b": 1})
    before = selector.node("a")["current_weight"]
    selector.pick(exclude=("a",))
    assert selector.node("a")["current_weight"] == before


def test_exclude_rejects_a_bare_string(make):
    selector = make({"a": 1, "ab": 1})
    with pytest.raises(TypeError, match="collection of node ids"):
        selector.pick(exclude="ab")


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.set_weight("c", 7),
        lambda s: s.set_up("c", False),
        lambda s: s.set_draining("c", True),
        lambda s: s.report("c", connections=10, capacity=100),
        lambda s: s.add("d", 3),
        lambda s: s.remove("c"),
    ],
    ids=["weight", "down", "draining", "report", "add", "remove"],
)
def test_changing_one_node_keeps_the_others_current_weights(make, change):
    selector = make({"a": 5, "b": 3, "c": 2})
    picks(selector, 4)
    before = {nid: selector.node(nid)["current_weight"] for nid in ("a", "b")}
    change(selector)
    assert {nid: selector.node(nid)["current_weight"] for nid in ("a", "b")} == before


def test_removed_then_readded_node_starts_fresh(make):
    selector = make({"a": 1, "b": 4})
    picks(selector, 3)
    selector.remove("a")
    selector.add("a", 1)
    assert selector.node("a")["current_weight"] == 0
    assert selector.ids() == ["b", "a"]  # re-added nodes go to the end of the peer order


def test_remove_keeps_slots_and_order_consistent(make):
    selector = make({f"n{i}": 1 for i in range(10)})
    for nid in ("n0", "n5", "n9"):
        selector.remove(nid)
    assert selector.ids() == ["n1", "n2", "n3", "n4", "n6", "n7", "n8"]
    assert len(selector) == 7 and "n5" not in selector and "n6" in selector
    assert picks(selector, 7) == selector.ids()
    selector.set_weight("n8", 3)  # the moved slots still answer to their ids
    assert selector.node("n8")["weight"] == 3


def test_many_nodes_grow_the_arrays(make):
    selector = make({f"n{i}": 1 + i % 3 for i in range(2000)})
    assert len(selector) == 2000
    counts = Counter(picks(selector, sum(1 + i % 3 for i in range(2000))))
    assert counts["n0"] == 1 and counts["n2"] == 3 and len(counts) == 2000


def test_pick_counts_as_pending(make):
    selector = make({"a": 1})
    picks(selector, 3)
    assert selector.node("a")["pending"] == 3
