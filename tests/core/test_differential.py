"""The compiled selector and the reference agree on every result, error and state.

Hypothesis generates random operation sequences, valid and invalid, applies each to both
implementations and compares what they return or raise and every node's full view after
every step. A shrunk counterexample is a minimal sequence that makes them differ.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_ext import _selector, reference

IDS = st.sampled_from([f"n{i}" for i in range(14)])  # more than one allocation of slots
WEIGHTS = st.one_of(st.integers(0, 20), st.integers(-3, 10_003), st.sampled_from([1.5, None, True]))
COUNTS = st.one_of(st.integers(0, 200), st.integers(-2, 2), st.sampled_from([10**9 + 1, 2.0]))
FLAGS = st.one_of(st.booleans(), st.sampled_from([1, "no"]))
RATIOS = st.integers(1, 100).map(lambda pct: pct / 100)
RATES = st.one_of(st.none(), st.floats(0.2, 40), st.sampled_from([0, -1.0, "5", float("nan")]))
NOW = st.integers(0, 5_000_000_000)  # nanoseconds: picks at random moments in 5 s

OPERATIONS = st.one_of(
    st.tuples(st.just("add"), IDS, WEIGHTS),
    st.tuples(st.just("remove"), IDS),
    st.tuples(st.just("set_weight"), IDS, WEIGHTS),
    st.tuples(st.just("set_up"), IDS, FLAGS),
    st.tuples(st.just("set_draining"), IDS, FLAGS),
    st.tuples(st.just("report"), IDS, COUNTS, COUNTS),
    st.tuples(st.just("report"), IDS, st.integers(0, 120), st.just(100)),
    st.tuples(st.just("pick")),
    st.tuples(st.just("pick")),
    st.tuples(st.just("pick"), st.lists(st.one_of(IDS, st.just("ghost")), max_size=3)),
    st.tuples(st.just("pick"), st.lists(st.one_of(IDS, st.just(["unhashable"])), max_size=3)),
    st.tuples(st.just("set_ramp"), IDS, st.one_of(st.integers(0, 1000), st.integers(-1, 1001))),
    st.tuples(st.just("restore")),
    st.tuples(st.just("set_rate"), IDS, RATES),
    st.tuples(st.just("pick"), st.lists(IDS, max_size=2), NOW),
    st.tuples(st.just("backups"), st.integers(-1, 6), st.lists(IDS, max_size=3), NOW),
    st.tuples(st.just("sample")),
    st.tuples(st.just("settle"), IDS, COUNTS),
    st.tuples(st.just("set_share"), st.one_of(st.integers(1, 5), st.integers(-1, 1025),
                                              st.sampled_from([1024, True, 2.0, None]))),
)


def apply(selector, operation):
    """Run one operation; return (selector to use next, outcome to compare)."""
    name, *args = operation
    if name == "restore":  # a save/restore in the middle must change nothing
        return type(selector).from_state(selector.state()), ("ok", None)
    try:
        return selector, ("ok", getattr(selector, name)(*args))
    except (ValueError, TypeError, KeyError) as exc:
        return selector, (type(exc).__name__, str(exc))


def views(selector):
    return [selector.node(nid) for nid in selector.ids()]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    watermarks=st.tuples(RATIOS, RATIOS).map(sorted),
    operations=st.lists(OPERATIONS, max_size=120),
)
def test_compiled_matches_reference(watermarks, operations):
    low, high = watermarks
    compiled = _selector.Selector(high_watermark=high, low_watermark=low)
    pure = reference.Selector(high_watermark=high, low_watermark=low)
    for step, operation in enumerate(operations):
        compiled, got = apply(compiled, operation)
        pure, expected = apply(pure, operation)
        assert got == expected, f"step {step}: {operation}"
        assert views(compiled) == views(pure), f"step {step}: {operation}"
        assert compiled.share == pure.share, f"step {step}: {operation}"
    assert compiled.state() == pure.state()


@settings(max_examples=100, deadline=None)
@given(weights=st.lists(st.integers(0, 10_000), min_size=1, max_size=40), picks=st.integers(1, 300))
def test_long_pick_sequences_agree_on_large_weights(weights, picks):
    compiled, pure = _selector.Selector(), reference.Selector()
    for i, weight in enumerate(weights):
        compiled.add(f"n{i}", weight)
        pure.add(f"n{i}", weight)
    assert [compiled.pick() for _ in range(picks)] == [pure.pick() for _ in range(picks)]
