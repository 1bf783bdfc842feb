"""The routing state is a fold of the log: live == replayed at every seq, snapshots or not."""

import asyncio
import tempfile

import hypothesis
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.domain import decisions
from dispatcher.domain import events as ev
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog.errors import LogCorrupted, RecordTooLarge
from dispatcher.eventlog.filelog import FileLog, LogReader
from dispatcher.eventlog.records import MAX_PAYLOAD
from dispatcher.eventlog.snapshots import SnapshotStore
from dispatcher.journal import Journal

IDS = st.sampled_from(["n1", "n2", "n3", "n4"])
COMMANDS = st.one_of(
    st.tuples(st.just("add"), IDS, st.integers(0, 9)),
    st.tuples(st.just("remove"), IDS),
    st.tuples(st.just("weight"), IDS, st.integers(0, 9)),
    st.tuples(st.just("address"), IDS, st.integers(1, 3)),
    st.tuples(st.just("drain"), IDS, st.booleans()),
    st.tuples(st.just("up"), IDS),
    st.tuples(st.just("down"), IDS, st.sampled_from(ev.HEALTH_CAUSES)),
    st.tuples(st.just("load"), IDS, st.integers(0, 120), st.sampled_from([100, 100, 50])),
    st.tuples(st.just("config"), st.sampled_from([(0.9, 0.8), (0.7, 0.5), (1.0, 1.0)])),
    st.tuples(st.just("pick"), st.integers(1, 5)),
)


def decide(state, command):
    name, *args = command
    actor = {"actor": "admin:test"}
    match name:
        case "add":
            return decisions.add_node(state, args[0], "10.0.0.1", 9000, args[1], **actor)
        case "remove":
            return decisions.remove_node(state, args[0], **actor)
        case "weight":
            return decisions.set_weight(state, args[0], args[1], **actor)
        case "address":
            return decisions.change_address(state, args[0], f"10.0.0.{args[1]}", 9000, **actor)
        case "drain":
            return decisions.set_draining(state, args[0], args[1], **actor)
        case "up":
            return decisions.mark_up(state, args[0])
        case "down":
            return decisions.mark_down(state, args[0], args[1], "test")
        case "load":
            return decisions.observe_load(state, args[0], args[1], args[2])
        case "config":
            high, low = args[0]
            balance = {"high_watermark": high, "low_watermark": low}
            return [ev.ConfigReloaded(source="test.toml", config={"balance": balance})]
    raise AssertionError(name)


def snapshot_of(state):
    return state.to_dict(), state.node_views()


async def run_live(path, commands, snapshot_every):
    """Drive a journal with the commands, one event per record call; views per seq."""
    journal = Journal(
        FileLog(path, fsync="never"), SnapshotStore(path / "snapshots"),
        snapshot_every=snapshot_every,
    )
    await journal.open()
    views = {0: snapshot_of(journal.state)}
    for command in commands:
        if command[0] == "pick":  # picks move per-worker positions, never routing state
            for _ in range(command[1]):
                journal.state.selector.pick()
            continue
        try:
            events = decide(journal.state, command)
        except decisions.InvalidCommand:
            continue
        for event in events:
            await journal.record([event])
            views[journal.state.seq] = snapshot_of(journal.state)
    await journal.close()
    return journal, views


async def reopen(path, snapshots):
    journal = Journal(FileLog(path), SnapshotStore(path / "snapshots") if snapshots else None)
    report = await journal.open()
    await journal.close()
    return journal, report


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    weights=st.lists(st.integers(0, 9), min_size=4, max_size=4),
    commands=st.lists(COMMANDS, min_size=20, max_size=80),
    snapshot_every=st.integers(1, 12),
)
def test_replay_equals_live_at_every_seq(weights, commands, snapshot_every):
    # Start with the nodes present, so most commands have something to act on.
    commands = [("add", f"n{i + 1}", w) for i, w in enumerate(weights)] + commands
    with tempfile.TemporaryDirectory() as directory:
        from pathlib import Path

        path = Path(directory)
        live, views = asyncio.run(run_live(path, commands, snapshot_every))

        replayed = RoutingState()
        assert snapshot_of(replayed) == views[0]
        for record in LogReader(path).records():
            replayed.apply(record.event())
            assert snapshot_of(replayed) == views[record.seq], f"seq {record.seq}"
        assert replayed.seq == live.state.seq
        hypothesis.event(f"events: {min(live.state.seq, 60) // 10 * 10}+")

        for snapshots in (True, False):
            reopened, report = asyncio.run(reopen(path, snapshots))
            assert snapshot_of(reopened.state) == views[live.state.seq]
            if snapshots and live.state.seq:
                assert report.snapshot_seq == live.state.seq  # close() left one at the end

        # Routing decisions follow the state alone: fresh selectors built from the replayed
        # and from the live state pick the same sequence.
        from_live = RoutingState.from_dict(live.state.to_dict()).selector
        assert [replayed.selector.pick() for _ in range(30)] == [
            from_live.pick() for _ in range(30)
        ]


def build(path, count, snapshot_every=10):
    async def run():
        journal = Journal(
            FileLog(path, fsync="never"), SnapshotStore(path / "snapshots"),
            snapshot_every=snapshot_every,
        )
        await journal.open()
        await journal.record(decisions.add_node(journal.state, "n1", "10.0.0.1", 9000, 3,
                                                actor="config"))
        for i in range(count - 1):
            await journal.record(decisions.observe_load(journal.state, "n1", i * 5 % 100, 100))
        await asyncio.sleep(0)  # let the last snapshot task start before close
        await journal.close()
        return journal

    return asyncio.run(run())


def test_start_up_replays_only_the_tail_after_the_newest_snapshot(tmp_path):
    live = build(tmp_path, 40, snapshot_every=10)
    store = SnapshotStore(tmp_path / "snapshots")
    newest = store.candidates(10**9)[0][0]
    (store.directory / f"snapshot-{newest.seq:020d}.json").unlink()  # as if crashed before
    reopened, report = asyncio.run(reopen(tmp_path, snapshots=True))
    assert report.snapshot_seq is not None and report.snapshot_seq < live.state.seq
    assert report.replayed == live.state.seq - report.snapshot_seq
    assert reopened.state.to_dict() == live.state.to_dict()


def test_unreadable_snapshot_is_skipped_with_a_note(tmp_path):
    live = build(tmp_path, 25)
    store = SnapshotStore(tmp_path / "snapshots")
    for _, path, _ in store.candidates(10**9):
        path.write_bytes(b"{not json")
    reopened, report = asyncio.run(reopen(tmp_path, snapshots=True))
    assert report.snapshot_seq is None and report.replayed == live.state.seq
    assert any("unreadable" in note for note in report.notes)
    assert reopened.state.to_dict() == live.state.to_dict()


def test_snapshot_from_another_log_is_skipped(tmp_path):
    build(tmp_path / "a", 25)
    live = build(tmp_path / "b", 25)
    for path in (tmp_path / "b" / "snapshots").iterdir():
        path.unlink()
    for path in (tmp_path / "a" / "snapshots").iterdir():  # same seqs, other hashes
        (tmp_path / "b" / "snapshots" / path.name).write_bytes(path.read_bytes())
    reopened, report = asyncio.run(reopen(tmp_path / "b", snapshots=True))
    assert report.snapshot_seq is None
    assert any("hash" in note for note in report.notes)
    assert reopened.state.to_dict() == live.state.to_dict()


def test_a_sound_snapshot_past_the_end_of_the_log_is_refused_until_salvaged(tmp_path):
    """It was written once the log held its seq: the records after the log's end were
    lost. Start refuses (and keeps it); salvaging goes on without it and removes it."""
    live = build(tmp_path, 25)
    store = SnapshotStore(tmp_path / "snapshots")
    newest = store.candidates(10**9)[0][0]
    newest.seq += 100
    ahead = store.save(newest)
    end = live.state.seq
    with pytest.raises(LogCorrupted, match=f"ends at seq {end}, but snapshot {ahead} holds "
                                           f"the state at seq {newest.seq}: records "
                                           f"{end + 1}..{newest.seq} were lost"):
        asyncio.run(reopen(tmp_path, snapshots=True))
    assert ahead.exists()

    async def salvage():
        journal = Journal(FileLog(tmp_path, salvage=True), store)
        report = await journal.open()
        await journal.close()
        return journal, report

    reopened, report = asyncio.run(salvage())
    assert any(f"removed snapshot {ahead.name}: past the log's end" in note
               for note in report.notes)
    assert reopened.state.to_dict() == live.state.to_dict()
    assert all(s.seq <= live.state.seq for s, _, _ in store.candidates(10**9) if s)


def test_a_file_past_the_end_that_is_no_snapshot_is_skipped_and_removed(tmp_path):
    live = build(tmp_path, 25)
    junk = tmp_path / "snapshots" / "snapshot-00000000000000000125.json"
    junk.write_text('{"format": 1, "seq": 125}')  # vouches for nothing
    reopened, report = asyncio.run(reopen(tmp_path, snapshots=True))
    assert any(f"removed snapshot {junk.name}: past the log's end" in note
               for note in report.notes)
    assert reopened.state.to_dict() == live.state.to_dict()
    assert not junk.exists()


def test_event_that_does_not_fit_is_refused_and_earlier_ones_kept(tmp_path):
    async def run():
        journal = Journal(FileLog(tmp_path))
        await journal.open()
        good = decisions.add_node(journal.state, "n1", "10.0.0.1", 9000, 1, actor="t")
        with pytest.raises(Exception, match="unknown node 'ghost'"):
            await journal.record([*good, ev.NodeUp(node="ghost")])
        assert journal.state.seq == 1 and list(journal.state.nodes) == ["n1"]
        await journal.close()

    asyncio.run(run())
    assert [e.type for e in LogReader(tmp_path).events()] == ["node_added"]


def test_an_event_the_log_refuses_changes_nothing_and_the_log_goes_on(tmp_path):
    """Over the record limit: refused before the state changes, so later events still
    continue the log and a restart rebuilds exactly the live state."""
    huge = {"balance": {}, "nodes": [{"id": "x" * (MAX_PAYLOAD // 2)}, {"id": "y" * 10}] * 2}

    async def run():
        journal = Journal(FileLog(tmp_path / "log", fsync="always"))
        await journal.open()
        await journal.record(decisions.add_node(journal.state, "n1", "10.0.0.1", 9000, 3,
                                                  actor="admin"))
        with pytest.raises(RecordTooLarge, match="over the event log's record limit"):
            await journal.record([ev.ConfigReloaded(source="big.toml", config=huge)])
        assert journal.state.seq == 1 and journal.state.config is None
        await journal.record(decisions.set_weight(journal.state, "n1", 5, actor="admin"))
        live = journal.state.to_dict()
        await journal.close()
        again = Journal(FileLog(tmp_path / "log"))
        await again.open()
        assert again.state.to_dict() == live
        await again.close()

    asyncio.run(run())
    assert [r.event().type for r in LogReader(tmp_path / "log").records()] == [
        "node_added", "node_weight_set"]


def test_the_bytes_applied_are_the_bytes_stored(tmp_path):
    """One encoding: the live state holds the event decoded from the very record written
    (a tuple becomes the list a replay sees), and the payload is encoded once."""

    async def run():
        journal = Journal(FileLog(tmp_path / "log", fsync="always"))
        await journal.open()
        config = {"balance": {}, "servers": ("a", "b")}
        [stored] = await journal.record([ev.ConfigReloaded(source="t.toml", config=config)])
        await journal.close()
        return stored, journal.state.config

    stored, live_config = asyncio.run(run())
    [record] = LogReader(tmp_path / "log").records()
    assert record.event() == stored and live_config == {"balance": {}, "servers": ["a", "b"]}
    assert record.payload == orjson.dumps(stored)


def test_an_admin_change_over_the_record_limit_is_413_and_changes_nothing(tmp_path):
    from types import SimpleNamespace

    from dispatcher import admin

    async def run():
        journal = Journal(FileLog(tmp_path / "log", fsync="always"))
        await journal.open()
        journal.log.max_payload = 120  # a record limit no node_added fits in
        runtime = SimpleNamespace(journal=journal, state=journal.state)
        status, body = await admin.execute(
            runtime, "add", {"id": "n1", "ip": "10.0.0.1", "port": 9000,
                             "reason": "r" * 200}, "admin")
        assert status == 413 and body["error"].startswith("nothing changed")
        assert journal.state.seq == 0 and journal.failure is None
        await journal.close()

    asyncio.run(run())
