"""The TOML configuration: defaults, every error naming file, line and key, and reloads
applied as a difference against the last recorded configuration."""

import asyncio
import dataclasses

import pytest

import core_ext
from dispatcher import config as cfg
from dispatcher.domain import decisions
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog.filelog import FileLog
from dispatcher.journal import Journal

GOOD = """
[http]
host = "127.0.0.1"
port = 8080
workers = 2

[nats]
servers = ["nats://127.0.0.1:4222"]

[poll]
interval = 1.0
timeout = 0.5
rise = 2
fall = 3

[balance]
high_watermark = 0.9
low_watermark = 0.8
slow_start = 0
panic_threshold = 0.5

[eventlog]
path = "/var/lib/imdispatch/events"
fsync = "always"

[[nodes]]
id = "n1"
ip = "10.0.0.1"
port = 9001
weight = 5

[[nodes]]
id = "n2"
ip = "10.0.0.2"
port = 9001
"""


def test_a_full_config_parses():
    config = cfg.parse(GOOD, "dispatcher.toml")
    assert config.http.workers == 2 and config.poll.fall == 3
    assert config.balance.slow_start == 0.0  # 0 turns slow start off
    assert config.eventlog.fsync == "always"
    assert [(n.id, n.weight) for n in config.nodes] == [("n1", 5), ("n2", 1)]
    assert config.recorded()["nodes"][1] == {"id": "n2", "ip": "10.0.0.2", "port": 9001,
                                             "weight": 1}


def test_empty_config_is_all_defaults():
    config = cfg.parse("", "empty.toml")
    assert config.http.port == 8080 and config.nodes == ()
    assert config.nats.servers == ("nats://127.0.0.1:4222",)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("workers = 2", "workerz = 2"), r"dispatcher.toml:5: \[http\] workerz: unknown key"),
        (("fall = 3", "fall = -3"), r"dispatcher.toml:14: \[poll\] fall: must be in 1..100"),
        (("fall = 3", 'fall = "3"'), r":14: \[poll\] fall: must be an integer"),
        (("timeout = 0.5", "timeout = 2.0"), r":12: \[poll\] timeout: must be shorter"),
        (("low_watermark = 0.8", "low_watermark = 0.95"),
         r":18: \[balance\] low_watermark: must not be above high_watermark"),
        (("high_watermark = 0.9", "high_watermark = 1.5"), r":17: \[balance\] high_watermark"),
        (('fsync = "always"', 'fsync = "sometimes"'), r":24: \[eventlog\] fsync: must be one"),
        (('ip = "10.0.0.2"', 'ip = "im2.example.com"'),
         r":34: \[\[nodes\]\] #2 ip: must be an IP address"),
        (('id = "n2"', 'id = "n1"'), r":33: \[\[nodes\]\] #2 id: duplicate node id 'n1'"),
        (('id = "n2"', 'id = "n.2"'), r"\[\[nodes\]\] #2 id: .*NATS subject token"),
        (("weight = 5", "weight = 5.5"), r":30: \[\[nodes\]\] #1 weight: must be an integer"),
        (("port = 9001\nweight", "weight"), r"\[\[nodes\]\] #1: `port` is required"),
        (('ip = "10.0.0.1"', "ip = 16909060"), r"#1 ip: must be an IP address"),
        # addresses no client can connect to (issue 13), one rule with the admin API's
        (('ip = "10.0.0.2"', 'ip = "224.0.0.1"'), r":34: \[\[nodes\]\] #2 ip: .*\(multicast\)"),
        (('ip = "10.0.0.2"', 'ip = "0.0.0.0"'), r":34: \[\[nodes\]\] #2 ip: .*unspecified"),
        (('ip = "10.0.0.2"', 'ip = "::"'), r":34: \[\[nodes\]\] #2 ip: .*unspecified"),
        (('ip = "10.0.0.2"', 'ip = "255.255.255.255"'), r":34: .* ip: .*broadcast"),
        (('ip = "10.0.0.2"', 'ip = "::ffff:224.0.0.1"'), r":34: .* ip: .*multicast"),
        (('ip = "10.0.0.2"', 'ip = "fe80::1%eth0"'), r":34: \[\[nodes\]\] #2 ip: .*scope id"),
        (('ip = "10.0.0.2"', 'ip = "fe80::1"'), r":34: .* ip: .*link-local"),
        (('ip = "10.0.0.2"', 'ip = "169.254.0.7"'), r":34: .* ip: .*link-local"),
        (('ip = "10.0.0.2"', 'ip = "0.0.0.1"'), r":34: .* ip: .*0\.0\.0\.0/8"),
        (('ip = "10.0.0.2"', 'ip = "::224.0.0.1"'), r":34: .* ip: .*IPv4-compatible"),
        (('ip = "10.0.0.2"', 'ip = "::255.255.255.255"'), r":34: .* ip: .*IPv4-compatible"),
        (('ip = "10.0.0.2"', 'ip = "64:ff9b::224.0.0.1"'), r":34: .* ip: .*multicast"),
        (('ip = "10.0.0.2"', 'ip = "::ffff:0:224.0.0.1"'), r":34: .* ip: .*multicast"),
        (("[poll]", "[pol]"), r":10: \[pol\]: unknown table"),
        (('servers = ["nats://127.0.0.1:4222"]', 'servers = ["127.0.0.1:4222"]'),
         r":8: \[nats\] servers: must be nats://"),
        (("port = 8080", "port = 8080\nport = 8081"), r"not valid TOML"),
    ],
)
def test_errors_name_file_line_and_key(edit, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.parse(GOOD.replace(*edit, 1), "dispatcher.toml")


def test_a_long_scope_id_is_refused_without_repeating_it():
    scoped = "fe80::1%" + "x" * 60_000
    with pytest.raises(cfg.ConfigError, match=r"#2 ip: .*scope id") as refused:
        cfg.parse(GOOD.replace('ip = "10.0.0.2"', f'ip = "{scoped}"', 1), "dispatcher.toml")
    assert len(str(refused.value)) < 400


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.0.0.1", "::1", "2001:db8::1", "64:ff9b::a00:1"])
def test_unicast_addresses_are_kept_in_their_canonical_form(ip):
    config = cfg.parse(GOOD.replace('ip = "10.0.0.2"', f'ip = "{ip}"', 1))
    assert config.nodes[1].ip == ip


def test_unreadable_file(tmp_path):
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load(tmp_path / "missing.toml")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(cfg.ConfigError, match="not UTF-8"):
        cfg.load(tmp_path / "binary.toml")


def test_reload_is_a_difference_against_the_last_recorded_config(tmp_path):
    async def run():
        journal = Journal(FileLog(tmp_path))
        await journal.open()
        state = journal.state
        first = cfg.parse(GOOD, "dispatcher.toml")
        events = decisions.reconcile_config(state, first.recorded(), "dispatcher.toml")
        assert [e.type for e in events] == ["node_added", "node_added", "config_reloaded"]
        await journal.record(events)
        # An operator sets n1's weight; the file still says 5.
        await journal.record(decisions.set_weight(state, "n1", 2, actor="admin:ops"))
        same = decisions.reconcile_config(state, first.recorded(), "dispatcher.toml")
        assert same == []  # nothing changed in the file: the admin's weight stands
        # The file changes n2's weight, moves n1 and adds n3; balance changes too.
        edited = GOOD.replace('ip = "10.0.0.1"', 'ip = "10.0.0.9"')
        edited += "weight = 4\n"  # in n2's table, the last one
        edited = edited.replace("high_watermark = 0.9", "high_watermark = 0.95")
        edited += '\n[[nodes]]\nid = "n3"\nip = "10.0.0.3"\nport = 9001\n'
        second = cfg.parse(edited, "dispatcher.toml")
        events = decisions.reconcile_config(state, second.recorded(), "dispatcher.toml")
        assert [(e.type, e.node_id) for e in events] == [
            ("node_address_changed", "n1"),  # only what the file changed: n1's admin
            ("node_weight_set", "n2"), ("node_added", "n3"), ("config_reloaded", None)]
        await journal.record(events)
        assert state.nodes["n1"].ip == "10.0.0.9" and state.high_watermark == 0.95
        assert state.nodes["n1"].weight == 2  # the admin's weight survives the ip edit
        # Removing a node from the file removes it.
        third = cfg.parse(edited.replace('id = "n3"\nip = "10.0.0.3"', 'id = "n4"\n'
                                                                        'ip = "10.0.0.4"'))
        kinds = [(e.type, e.node_id) for e in decisions.reconcile_config(
            state, third.recorded(), "dispatcher.toml")]
        assert ("node_removed", "n3") in kinds and ("node_added", "n4") in kinds
        await journal.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("high_watermark = 0.9", "high_watermark = 0.0000001"),
         r"dispatcher.toml:17: \[balance\] high_watermark: the selection core refuses it"),
        (("low_watermark = 0.8", "low_watermark = 0.0000004"),
         r"dispatcher.toml:18: \[balance\] low_watermark: the selection core refuses it"),
        (("high_watermark = 0.9", "high_watermark = true"),
         r":17: \[balance\] high_watermark: the selection core refuses it"),
    ],
)
def test_watermarks_are_checked_by_the_selection_core(edit, message):
    """One judge of what the core accepts: a value it would refuse when the reload is
    recorded is refused when the file is read, before anything is recorded."""
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.parse(GOOD.replace(*edit, 1), "dispatcher.toml")
    core_ext.watermarks_ppm(0.9, 0.8)  # what the file says otherwise, the core accepts


def test_the_recorded_config_holds_every_reloadable_setting_and_no_secret():
    text = GOOD.replace("[http]\n", "[http]\nretry_after = 9\n").replace(
        "[nats]\n", '[nats]\npassword = "hunter2"\n').replace("fall = 3", "fall = 3\n"
                                                             "stale_after = 4.5")
    config = cfg.parse(text, "dispatcher.toml")
    recorded = config.recorded()
    assert recorded["http"] == {"retry_after": 9}
    assert recorded["poll"]["stale_after"] == 4.5 and recorded["balance"]["slow_start"] == 0
    assert "hunter2" not in repr(recorded) and "nats" not in recorded
    follower = cfg.Config().with_recorded(recorded)  # a follower's settings: the log's
    assert follower.recorded() == recorded and follower.source == cfg.FROM_LOG
    assert follower.http.retry_after == 9 and follower.poll.stale_after == 4.5
    assert follower.http.port == cfg.Config().http.port  # fixed at start: not recorded
    old = {"balance": recorded["balance"], "nodes": recorded["nodes"]}  # an older log
    assert cfg.Config().with_recorded(old).poll == cfg.Config().poll
    with pytest.raises(cfg.ConfigError, match=r"recorded configuration: \[poll\] fall"):
        cfg.Config().with_recorded({**recorded, "poll": {"fall": 0}})


def test_no_more_nodes_than_the_core_routes(monkeypatch):
    """One limit for the file, the admin API and the selection core's shared ledger."""
    monkeypatch.setattr(core_ext, "MAX_NODES", 3)
    nodes = "".join(f'[[nodes]]\nid = "n{i}"\nip = "10.0.0.1"\nport = 9001\n' for i in range(4))
    with pytest.raises(cfg.ConfigError, match=r"\[\[nodes\]\] #4.*at most 3 nodes"):
        cfg.parse(nodes)
    state = RoutingState()
    for i in range(3):
        for event in decisions.add_node(state, f"n{i}", "10.0.0.1", 9001, actor="t"):
            state.apply(dataclasses.replace(event, seq=state.seq + 1))
    with pytest.raises(decisions.TooManyNodes, match="at most 3 nodes"):
        decisions.add_node(state, "n3", "10.0.0.1", 9001, actor="t")


@pytest.mark.parametrize("text", ["", '[http]\nport = 8081\n'])
def test_a_config_without_nodes_is_warned_about_once_saying_how_to_add_them(
        tmp_path, caplog, text):
    path = tmp_path / "dispatcher.toml"
    path.write_text(text)
    with caplog.at_level("WARNING", logger="imdispatch"):
        cfg.load(path)
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"{path} has no [[nodes]]" in warning and "\n" not in warning
    assert "[[nodes]] tables (id, ip, port)" in warning and "POST /admin/nodes" in warning
    caplog.clear()
    path.write_text(GOOD)
    with caplog.at_level("WARNING", logger="imdispatch"):
        cfg.load(path)
    assert not caplog.records
