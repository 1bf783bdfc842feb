"""Bad input: a clear exception naming the node and the value, and no change of state."""

import math

import pytest

from core_ext import DuplicateNode, InvalidArgument, InvalidArgumentType, SelectorError, UnknownNode


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1, InvalidArgument, r"node 'n1': weight must be in 0\.\.10000, got -1"),
        (10_001, InvalidArgument, r"got 10001"),
        (1.5, InvalidArgumentType, r"weight must be an int in 0\.\.10000, got 1\.5 \(float\)"),
        (True, InvalidArgumentType, r"got True \(bool\)"),
        ("5", InvalidArgumentType, r"got '5' \(str\)"),
        (None, InvalidArgumentType, r"got None"),
    ],
)
def test_bad_weight(make, value, error, message):
    selector = make({"a": 1})
    with pytest.raises(error, match=message):
        selector.add("n1", value)
    assert "n1" not in selector
    with pytest.raises(error):
        selector.set_weight("a", value)
    assert selector.node("a")["weight"] == 1


def test_weight_errors_are_value_errors_as_the_contract_says(make):
    with pytest.raises(ValueError):
        make().add("n1", weight=2.0)
    with pytest.raises(TypeError):
        make().add("n1", weight=2.0)


@pytest.mark.parametrize("bad_id", ["", 5, None, b"n1"])
def test_bad_node_id(make, bad_id):
    with pytest.raises((InvalidArgument, InvalidArgumentType), match="node id"):
        make().add(bad_id, 1)


def test_duplicate_id(make):
    selector = make({"n1": 3})
    with pytest.raises(DuplicateNode, match="node 'n1' already exists"):
        selector.add("n1", 5)
    assert selector.node("n1")["weight"] == 3
    assert isinstance(DuplicateNode("x"), ValueError)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.remove("ghost"),
        lambda s: s.set_weight("ghost", 1),
        lambda s: s.set_up("ghost", True),
        lambda s: s.set_draining("ghost", True),
        lambda s: s.report("ghost", connections=1, capacity=2),
        lambda s: s.node("ghost"),
        lambda s: s.node(["ghost"]),
        lambda s: s.remove({"ghost"}),
    ],
)
def test_unknown_id(make, call):
    with pytest.raises(KeyError) as info:
        call(make({"a": 1}))
    assert isinstance(info.value, UnknownNode)
    assert str(info.value).startswith("unknown node ") and "ghost" in str(info.value)


@pytest.mark.parametrize(
    ("connections", "capacity", "message"),
    [
        (-1, 10, r"node 'a': connections must be in 0\.\.1000000000, got -1"),
        (1, 0, r"node 'a': capacity must be in 1\.\.1000000000, got 0"),
        (1, -5, r"capacity must be in 1\.\.1000000000, got -5"),
        (1, 10**10, r"capacity must be in 1\.\.1000000000, got 10000000000"),
        (1.0, 10, r"connections must be an int, got 1\.0 \(float\)"),
        (1, "10", r"capacity must be an int, got '10' \(str\)"),
        (math.nan, 10, r"connections must be an int, got nan"),
    ],
)
def test_bad_report_changes_nothing(make, connections, capacity, message):
    selector = make({"a": 1})
    selector.report("a", connections=3, capacity=10)
    selector.pick()
    before = selector.node("a")
    with pytest.raises(SelectorError, match=message):
        selector.report("a", connections=connections, capacity=capacity)
    assert selector.node("a") == before


@pytest.mark.parametrize("value", [1, 0, "yes", None, 1.0])
def test_flags_must_be_bools(make, value):
    selector = make({"a": 1})
    with pytest.raises(InvalidArgumentType, match=r"node 'a': up must be a bool"):
        selector.set_up("a", value)
    with pytest.raises(InvalidArgumentType, match=r"node 'a': draining must be a bool"):
        selector.set_draining("a", value)
    assert selector.node("a")["up"] is True and selector.node("a")["draining"] is False


@pytest.mark.parametrize(
    ("high", "low", "message"),
    [
        (0.7, 0.8, r"low_watermark \(0\.8\) must not be above high_watermark \(0\.7\)"),
        (1.5, 0.8, r"high_watermark must be in \[0\.000001, 1\], got 1\.5"),
        (0.9, 0, r"low_watermark must be in"),
        (0.9, -0.1, r"low_watermark must be in"),
        (math.nan, 0.5, r"high_watermark must be in"),
        (math.inf, 0.5, r"high_watermark must be in"),
        (1e-9, 1e-9, r"high_watermark must be in"),
        ("0.9", 0.8, r"high_watermark must be a number, got '0\.9' \(str\)"),
        (True, 0.8, r"high_watermark must be a number"),
    ],
)
def test_bad_watermarks(Selector, high, low, message):
    with pytest.raises(SelectorError, match=message):
        Selector(high_watermark=high, low_watermark=low)


def test_watermarks_may_be_ints_and_default_to_contract_values(Selector):
    assert Selector(1, 1).high_watermark == 1
    default = Selector()
    assert (default.high_watermark, default.low_watermark) == (0.9, 0.8)
