"""`imdispatch replay | audit | verify | recover` on a real log, as an operator runs them."""

import asyncio
import itertools
import os
import subprocess
import sys

import orjson
import pytest

from dispatcher.domain import decisions
from dispatcher.eventlog.filelog import FileLog
from dispatcher.eventlog.segments import list_segments
from dispatcher.eventlog.snapshots import SnapshotStore
from dispatcher.journal import Journal


def imdispatch(*args, timeout=120, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


async def record_day(log, snapshots=None):
    """A small cluster's day recorded through a journal on `log`, at fixed times (so any
    backend holds the same events): returns the node views at seq 6 and at the end."""
    ticks = itertools.count()
    journal = Journal(log, snapshots, snapshot_every=5,
                      clock=lambda: 1_800_000_000.0 + next(ticks))
    await journal.open()
    state = journal.state
    for node, weight in (("n1", 5), ("n2", 3), ("n3", 1)):
        await journal.record(decisions.add_node(state, node, f"10.0.0.{weight}", 9001,
                                                weight, actor="config"))
        await journal.record(decisions.mark_up(state, node))
    at_six = journal.state.node_views()
    await journal.record(decisions.mark_down(state, "n3", "no_responders", "gone"))
    await journal.record(decisions.set_draining(state, "n2", True, actor="admin:ops",
                                                reason="kernel upgrade"))
    for connections in (100, 950, 700):
        await journal.record(decisions.observe_load(state, "n1", connections, 1000))
    await journal.close()
    return at_six, journal.state.node_views()


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """A log of a small cluster's day: returns (path, live state at seq 6, final state)."""
    path = tmp_path_factory.mktemp("cli") / "log"
    at_six, final = asyncio.run(record_day(FileLog(path, fsync="always"),
                                           SnapshotStore(path / "snapshots")))
    return path, at_six, final


def json_views(views):
    return orjson.loads(orjson.dumps(views))


def test_replay_json_is_the_node_objects(log):
    path, at_six, final = log
    result = imdispatch("replay", "--log", path, "--json")
    assert result.returncode == 0, result.stderr
    nodes = orjson.loads(result.stdout)
    assert nodes == json_views(final)
    n1 = nodes[0]
    for field in ("id", "ip", "port", "weight", "effective_weight", "health", "overloaded",
                  "draining", "connections", "capacity"):
        assert field in n1
    assert [n["health"] for n in nodes] == ["up", "up", "down"]
    until = imdispatch("replay", "--log", path, "--until", 6, "--json")
    assert orjson.loads(until.stdout) == json_views(at_six)


def test_replay_table(log):
    result = imdispatch("replay", "--log", log[0])
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("state at seq ") and "3 nodes" in lines[0]
    assert lines[1].split()[:3] == ["NODE", "ADDRESS", "WEIGHT"]
    assert "down (no_responders)" in result.stdout


def test_audit_filters_and_json(log):
    result = imdispatch("audit", "--log", log[0], "--node", "n2", "--type", "node_drained",
                        "--json")
    assert result.returncode == 0
    (event,) = orjson.loads(result.stdout)
    assert event["type"] == "node_drained" and event["actor"] == "admin:ops"
    assert event["reason"] == "kernel upgrade" and event["seq"] == 8
    table = imdispatch("audit", "--log", log[0], "--node", "n1")
    assert table.stdout.splitlines()[0].split() == [
        "SEQ", "TIME", "TYPE", "NODE", "ACTOR", "DETAILS", "REASON"
    ]
    assert "node_overloaded" in table.stdout and "connections=950" in table.stdout
    assert "n2" not in table.stdout


@pytest.mark.parametrize(
    "args",
    [("audit", "--log", "L", "--type", "bogus"), ("replay", "--log", "L", "--until", "-1"),
     ("verify", "--log")],
)
def test_bad_arguments_are_usage_errors(args):
    result = imdispatch(*args)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_missing_log_is_a_clear_error(tmp_path):
    result = imdispatch("verify", "--log", tmp_path / "nope")
    assert result.returncode == 2 and "no event log at" in result.stderr


def test_verify_passes_then_names_the_first_bad_record(log, tmp_path):
    path = log[0]
    good = imdispatch("verify", "--log", path)
    assert good.returncode == 0 and "ok: every checksum" in good.stdout
    assert "matches the log" in good.stdout  # snapshots are checked too
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(path), str(broken)], check=True)
    segment = list_segments(broken)[0]
    data = bytearray(segment.read_bytes())
    data[-400] ^= 0x01  # inside one of the last records
    segment.write_bytes(bytes(data))
    bad = imdispatch("verify", "--log", broken)
    assert bad.returncode == 1
    assert f"corrupted in {segment}" in bad.stderr and "at offset" in bad.stderr
    assert "(seq " in bad.stderr


def test_recover_truncates_a_torn_tail_and_salvages_on_request(log, tmp_path):
    torn = tmp_path / "torn"
    subprocess.run(["cp", "-r", str(log[0]), str(torn)], check=True)
    # A torn tail is a crash's: no clean stop vouches for the end, no snapshot is past it
    # (one is written only once the log has its seq on disk)
    (torn / "CLEAN").unlink()
    (torn / "snapshots" / "snapshot-00000000000000000013.json").unlink()
    segment = list_segments(torn)[0]
    os.truncate(segment, segment.stat().st_size - 10)
    result = imdispatch("recover", "--log", torn)
    assert result.returncode == 0 and "torn tail" in result.stdout
    assert "the log ends at seq 12" in result.stdout  # of 13: the last one was torn

    corrupt = tmp_path / "corrupt"
    subprocess.run(["cp", "-r", str(log[0]), str(corrupt)], check=True)
    segment = list_segments(corrupt)[0]
    data = bytearray(segment.read_bytes())
    data[200] ^= 0x01
    segment.write_bytes(bytes(data))
    refused = imdispatch("recover", "--log", corrupt)
    assert refused.returncode == 1 and "--salvage" in refused.stderr
    salvaged = imdispatch("recover", "--log", corrupt, "--salvage")
    assert salvaged.returncode == 0 and "salvaged" in salvaged.stdout
    assert imdispatch("verify", "--log", corrupt).returncode == 0
