"""The selector picks in exactly the order a real nginx's upstream round-robin does.

`tests/data/nginx_order.json` was recorded from nginx itself by
`tests/data/record_nginx_order.py` (refresh it by running that script); the live test
records afresh when an nginx binary is installed.
"""

import importlib.util
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
GOLDEN = json.loads((DATA / "nginx_order.json").read_text())


def _load_recorder():
    spec = importlib.util.spec_from_file_location(
        "record_nginx_order", DATA / "record_nginx_order.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recorder = _load_recorder()
NGINX = recorder.find_nginx()
LIVE_WEIGHTS = {"a": 4, "b": 1, "c": 3, "d": 2, "e": 3}  # not one of the golden sets


def _case_id(case):
    return "-".join(f"{name}{weight}" for name, weight in case["weights"].items())


def _picks(selector, count):
    return [selector.pick() for _ in range(count)]


def test_golden_file_is_nginx_documented_order():
    """Guards the recording itself: nginx's own example for weights 5, 1, 1."""
    case = next(c for c in GOLDEN if c["weights"] == {"a": 5, "b": 1, "c": 1})
    assert case["sequence"][:7] == ["a", "a", "b", "a", "c", "a", "a"]
    assert len(GOLDEN) >= 8


@pytest.mark.parametrize("case", GOLDEN, ids=_case_id)
def test_matches_recorded_nginx_order(make, case):
    selector = make(case["weights"])
    assert _picks(selector, len(case["sequence"])) == case["sequence"]


@pytest.fixture(scope="module")
def live_sequence():
    if NGINX is None:
        pytest.skip("no nginx binary (neither on PATH nor /usr/sbin/nginx): install nginx-light")
    return recorder.record(NGINX, LIVE_WEIGHTS, 2 * sum(LIVE_WEIGHTS.values()))


def test_matches_live_nginx(make, live_sequence):
    assert len(live_sequence) == 2 * sum(LIVE_WEIGHTS.values())
    selector = make(LIVE_WEIGHTS)
    assert _picks(selector, len(live_sequence)) == live_sequence
