"""Saving and restoring the selector's full state, across both implementations."""

import copy
import pickle

import orjson
import pytest

from core_ext import DuplicateNode, InvalidArgument, InvalidArgumentType, SelectorError
from core_ext.implementations import IMPLEMENTATIONS


def busy_selector(make):
    selector = make({"a": 5, "b": 1, "c": 3, "z": 0}, high_watermark=0.75, low_watermark=0.5)
    selector.report("a", connections=40, capacity=100)
    selector.report("c", connections=74, capacity=100)
    selector.set_draining("b", True)
    for _ in range(7):
        selector.pick()
    return selector


def test_state_is_plain_data_that_survives_json(make):
    state = busy_selector(make).state()
    assert orjson.loads(orjson.dumps(state)) == state
    assert state["version"] == 1
    assert [node["id"] for node in state["nodes"]] == ["a", "b", "c", "z"]
    assert state["nodes"][1]["draining"] is True
    assert state["nodes"][3]["connections"] is None


@pytest.mark.parametrize("target", sorted(IMPLEMENTATIONS))
def test_restored_selector_continues_exactly(make, target):
    original = busy_selector(make)
    restored = IMPLEMENTATIONS[target].from_state(original.state())
    assert restored.state() == original.state()
    assert [restored.node(n) for n in restored.ids()] == [original.node(n) for n in original.ids()]
    assert [restored.pick() for _ in range(50)] == [original.pick() for _ in range(50)]
    assert (restored.high_watermark, restored.low_watermark) == (0.75, 0.5)


@pytest.mark.parametrize(
    "clone", [lambda s: pickle.loads(pickle.dumps(s)), copy.deepcopy], ids=["pickle", "deepcopy"]
)
def test_pickle_and_deepcopy_continue_exactly(make, clone):
    original = busy_selector(make)
    copied = clone(original)
    assert type(copied) is type(original)
    assert copied.state() == original.state()
    assert [copied.pick() for _ in range(9)] == [original.pick() for _ in range(9)]


def test_state_is_a_copy(make):
    selector = busy_selector(make)
    state = selector.state()
    state["nodes"][0]["weight"] = 99
    assert selector.node("a")["weight"] == 5


def _broken(make, edit):
    state = busy_selector(make).state()
    edit(state)
    return state


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda s: s.update(version=2), InvalidArgument, r"version 2 is not supported"),
        (lambda s: s.pop("nodes"), InvalidArgument, r"missing fields \['nodes'\]"),
        (lambda s: s.update(extra=1), InvalidArgument, r"unknown fields \['extra'\]"),
        (lambda s: s.update(nodes={}), InvalidArgumentType, r"nodes must be a list"),
        (lambda s: s["nodes"].append(s["nodes"][0]), DuplicateNode, r"node 'a' already exists"),
        (lambda s: s["nodes"][0].update(weight=-2), InvalidArgument, r"node 'a': weight"),
        (lambda s: s["nodes"][0].update(current_weight=1.5), InvalidArgument, r"current_weight"),
        (lambda s: s["nodes"][0].update(current_weight=10**16), InvalidArgument, r"current_weight"),
        (lambda s: s["nodes"][0].update(up="yes"), InvalidArgumentType, r"node 'a': up must be"),
        (lambda s: s["nodes"][0].update(capacity=None), InvalidArgument, r"both be set or null"),
        (lambda s: s["nodes"][0].update(capacity=0), InvalidArgument, r"capacity must be in"),
        (lambda s: s["nodes"][0].update(pending=-1), InvalidArgument, r"pending must be in"),
        (lambda s: s["nodes"][0].pop("pending"), InvalidArgument, r"node #0: missing fields"),
        (lambda s: s.update(high_watermark=0.1), InvalidArgument, r"low_watermark"),
    ],
)
def test_bad_state_is_refused(make, Selector, edit, error, message):
    with pytest.raises(error, match=message):
        Selector.from_state(_broken(make, edit))


def test_state_must_be_a_mapping(Selector):
    with pytest.raises(SelectorError, match="selector state must be a mapping"):
        Selector.from_state([])


def test_from_state_does_not_alter_its_input(make, Selector):
    state = busy_selector(make).state()
    kept = copy.deepcopy(state)
    Selector.from_state(state)
    assert state == kept
