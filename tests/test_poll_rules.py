"""Status replies, health rise/fall and pick parameters (pure rules)."""

import orjson
import pytest

from dispatcher.domain.health import Failure, HealthTracker, NodeStatus, parse_status
from dispatcher.query import PickRequest, QueryError, from_json, from_query_string

GOOD = {"node_id": "n1", "ip": "10.0.0.1", "port": 9001, "connections": 10, "capacity": 100,
        "accepting": True, "draining": False, "cpu": 0.1, "loop_lag_ms": 0.5, "uptime_s": 3.0,
        "version": "0.1.0", "ts": 1.8e9}


def test_good_status():
    assert parse_status("n1", orjson.dumps(GOOD)) == NodeStatus(10, 100, True, False)


@pytest.mark.parametrize(
    ("change", "cause", "detail"),
    [
        ({"node_id": "n2"}, "identity_mismatch", "node 'n1' was asked, 'n2' answered"),
        ({"connections": -1}, "bad_reply", "`connections` must be in"),
        ({"connections": "10"}, "bad_reply", "`connections` must be int"),
        ({"capacity": 0}, "bad_reply", "`capacity` must be in"),
        ({"capacity": 10**12}, "bad_reply", "`capacity` must be in"),
        ({"ip": "not-an-ip"}, "bad_reply", "`ip` must be an IP address"),
        ({"ip": "224.0.0.1"}, "bad_reply", "`ip` must be a unicast address"),
        ({"ip": "fe80::1%" + "x" * 60_000}, "bad_reply", "scope id"),
        ({"port": 70000}, "bad_reply", "`port` must be in"),
        ({"cpu": -1}, "bad_reply", "`cpu` must not be negative"),
        ({"accepting": 1}, "bad_reply", "`accepting` must be bool"),
        ({"draining": True}, "draining", "draining"),
        ({"version": None}, "bad_reply", "`version`"),
    ],
)
def test_bad_status(change, cause, detail):
    result = parse_status("n1", orjson.dumps({**GOOD, **change}))
    assert isinstance(result, Failure) and result.cause == cause and detail in result.detail


@pytest.mark.parametrize(("data", "detail"), [
    (b"{nope", "not JSON"), (b"[1]", "not a JSON object"), (b"x" * 70_000, "larger than"),
    (b'{"node_id":"n1","cpu":NaN}', "not JSON"),
])
def test_unreadable_status(data, detail):
    result = parse_status("n1", data)
    assert result.cause == "bad_reply" and detail in result.detail


def test_rise_and_fall():
    tracker = HealthTracker(rise=2, fall=3)
    ok, timeout = NodeStatus(1, 10, True, False), Failure("timeout", "slow")
    assert tracker.observe("n1", ok, "unknown") is None
    assert tracker.observe("n1", ok, "unknown") == "up"
    assert [tracker.observe("n1", timeout, "up") for _ in range(3)] == [None, None, "down"]
    assert tracker.observe("n1", ok, "down") is None  # one success is not enough to rise
    assert tracker.observe("n1", timeout, "down") is None  # and the streak starts over
    assert tracker.observe("n1", ok, "down") is None
    assert tracker.observe("n1", ok, "down") == "up"


@pytest.mark.parametrize("cause", ["no_responders", "draining"])
def test_sure_failures_take_a_node_out_at_once(cause):
    tracker = HealthTracker(rise=2, fall=5)
    assert tracker.observe("n1", Failure(cause, "gone"), "up") == "down"


def test_raw_query_strings():
    pick = from_query_string("uid=a%40b&exclude=n1%2Cn2&count=2&extra=1&count_typo")
    assert pick == PickRequest(("n1", "n2"), 2)
    assert from_query_string("") == from_query_string("app=1&app=2") == PickRequest()
    with pytest.raises(QueryError, match="given once"):
        from_query_string("count=1&count=2")
    with pytest.raises(QueryError, match="uid"):
        from_query_string("uid=a+b")  # a space


def test_query_parameters():
    assert from_query_string("").count == 1
    pick = from_query_string("uid=u1&exclude=n1,n2,&count=3&app=x")
    assert pick == PickRequest(("n1", "n2"), 3)
    assert from_json({"exclude": ["n1"], "count": 2}).exclude == ("n1",)


@pytest.mark.parametrize("query", [
    "count=0", "count=6", "count=-1", "count=1e3", "count=%C2%B2", "count=%D9%A3",
    "count=1&count=2", "uid=1&uid=1", "exclude=a&exclude=b", "uid=a%20b", "uid=" + "x" * 129,
    "uid=", "exclude=n.1", "exclude=" + ",".join(f"n{i}" for i in range(65)),
])
def test_bad_query_parameters(query):
    with pytest.raises(QueryError):
        from_query_string(query)


@pytest.mark.parametrize("body", [[], {"count": "2"}, {"count": True}, {"exclude": [1]},
                                  {"uid": 5}])
def test_bad_json_parameters(body):
    with pytest.raises(QueryError):
        from_json(body)


def test_admin_tokens():
    from dispatcher.web import admin_tokens

    assert admin_tokens("ops:s3cret, plain ,:, dev:") == [
        ("admin:ops", b"s3cret"), ("admin", b"plain")]  # empty secrets are ignored
    assert admin_tokens(None) == [] and admin_tokens("") == []
