"""Bounded history: the retention rule, the file log applying it, and the log tools
anchored at the oldest kept snapshot (real files, real `imdispatch` commands)."""

import asyncio
import itertools
import os
import subprocess
import sys

import orjson
import pytest

from dispatcher import logtools
from dispatcher.domain import decisions
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog.filelog import FileLog, LogReader, LogTail
from dispatcher.eventlog.retention import (
    BeforeHistory,
    HistoryTrimmed,
    Retention,
    Unit,
    plan,
)
from dispatcher.eventlog.segments import list_segments
from dispatcher.eventlog.snapshots import SnapshotStore
from dispatcher.journal import Journal, rebuild

NODES = ("n1", "n2", "n3")


# -- the rule ----------------------------------------------------------------------------


def units(*bounds, time=0.0):
    return [Unit(first, last, time) for first, last in bounds]


def test_nothing_goes_when_both_limits_are_zero():
    result = plan(Retention(keep_snapshots=1), start=1, last_seq=1000,
                  units=units((1, 100), (101, 200), (201, 300)), snapshots=[250, 500],
                  sound=lambda seq: True, now=10**10)
    assert (result.units, result.start) == (0, 1)
    assert result.snapshots == [250]  # beyond keep_snapshots: the newest anchors


def test_events_go_up_to_the_oldest_kept_snapshot_in_whole_units():
    every = units((1, 100), (101, 200), (201, 300), (301, 400))
    result = plan(Retention(keep_snapshots=2, retain_events=10), start=1, last_seq=1000,
                  units=every, snapshots=[120, 250, 350], sound=lambda seq: True, now=0)
    # kept: 250 and 350; the anchor is 250: units up to 200 go, 201..300 holds seq 250
    assert (result.units, result.start, result.anchor) == (2, 201, 250)
    assert result.snapshots == [120]


def test_the_newest_retain_events_stay():
    result = plan(Retention(retain_events=850), start=1, last_seq=1000,
                  units=units((1, 100), (101, 200), (201, 300)), snapshots=[300, 900],
                  sound=lambda seq: True, now=0)
    assert (result.units, result.start) == (1, 101)  # 101..200 has events of the newest 850


def test_age_limit_by_the_last_record_of_each_unit():
    day = 86_400.0
    every = [Unit(1, 100, 1 * day), Unit(101, 200, 5 * day), Unit(201, 300, 9 * day)]
    result = plan(Retention(retain_days=3), start=1, last_seq=400, units=every,
                  snapshots=[300, 390], sound=lambda seq: True, now=10 * day)
    assert (result.units, result.start) == (2, 201)


def test_a_damaged_oldest_kept_snapshot_is_no_anchor():
    result = plan(Retention(keep_snapshots=2, retain_events=1), start=1, last_seq=1000,
                  units=units((1, 100), (101, 200), (201, 300)), snapshots=[150, 250],
                  sound=lambda seq: seq != 150, now=0)
    assert (result.units, result.anchor) == (2, 250)
    result = plan(Retention(keep_snapshots=2, retain_events=1), start=1, last_seq=1000,
                  units=units((1, 100)), snapshots=[150, 250], sound=lambda seq: False, now=0)
    assert (result.units, result.snapshots, result.anchor) == (0, [], None)


# -- the file log ------------------------------------------------------------------------


def record(path, count, *, retention, snapshot_every=20, segment_bytes=4096, start=True):
    """`count` changes recorded through a journal on a file log at `path` with
    `retention`, snapshots every `snapshot_every` events; returns the final node views."""

    async def run():
        ticks = itertools.count()
        log = FileLog(path, segment_bytes=segment_bytes, retention=retention)
        journal = Journal(log, SnapshotStore(path / "snapshots", retention.keep_snapshots),
                          snapshot_every=snapshot_every,
                          clock=lambda: 1_800_000_000.0 + next(ticks))
        await journal.open()
        state = journal.state
        if start:
            for node in NODES:
                await journal.record(decisions.add_node(state, node, "10.0.0.1", 9001, 5,
                                                        actor="config"))
        for i in range(count):
            node = NODES[i % 3]
            weight = state.nodes[node].weight % 9 + 1  # a change every time
            await journal.record(decisions.set_weight(state, node, weight, actor="admin:t"))
            if log._retaining is not None and i % 50 == 0:
                await log._retaining  # the last run done: each later rotation starts one
        views = journal.state.node_views()
        await journal.close()
        return views

    return asyncio.run(run())


def first_seq(path):
    return int(list_segments(path)[0].name[:20])


def disk_use(path):
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def test_a_bounded_file_log_drops_old_segments_and_stays_whole(tmp_path):
    path = tmp_path / "log"
    retention = Retention(keep_snapshots=2, retain_events=100)
    record(path, 400, retention=retention)
    use_after_400 = disk_use(path)
    views = record(path, 1600, retention=retention, start=False)
    assert first_seq(path) > 1000  # old segments went while it ran
    assert disk_use(path) < 2 * use_after_400  # 4x the events, not 4x the bytes
    snapshots = SnapshotStore(path / "snapshots").seqs()
    assert len(snapshots) <= 2 and snapshots[0] >= first_seq(path) - 1
    # the history still folds, from its anchor, into the state the journal had
    state, _ = logtools.replay(path)
    assert orjson.dumps(state.node_views()) == orjson.dumps(views)
    result = logtools.verify(path)
    assert result.bad_snapshots == 0 and result.first_seq == first_seq(path)
    assert result.start.anchor == snapshots[0]
    assert f"history starts after seq {snapshots[0]}" in result.start.describe()
    # and a journal starts on it again, from a snapshot
    rebuilt = asyncio.run(rebuild(LogReader(path).read, SnapshotStore(path / "snapshots")))
    assert rebuilt.snapshot_seq == snapshots[-1]
    assert orjson.dumps(rebuilt.state.node_views()) == orjson.dumps(views)


def test_recover_and_check_take_a_bounded_log(tmp_path):
    path = tmp_path / "log"
    record(path, 400, retention=Retention(keep_snapshots=2, retain_events=30))
    start = first_seq(path)
    assert start > 1
    FileLog(path).check()  # the supervisor's check before the workers start
    recovery = logtools.recover(path)
    assert recovery.last_seq == 403 and first_seq(path) == start


def test_retention_at_zero_drops_no_event(tmp_path):
    path = tmp_path / "log"
    record(path, 800, retention=Retention(keep_snapshots=1))
    assert len(list_segments(path)) > 10 and first_seq(path) == 1
    assert len(SnapshotStore(path / "snapshots").seqs()) == 1
    assert logtools.verify(path).records == 803


def test_the_age_limit_drops_nothing_younger(tmp_path):
    path = tmp_path / "log"
    record(path, 800, retention=Retention(retain_days=1))
    assert first_seq(path) == 1  # every segment was written just now


def test_age_limit_drops_segments_recorded_long_ago(tmp_path):
    path = tmp_path / "log"
    record(path, 800, retention=Retention())
    long_ago = 1_000_000_000
    for segment in list_segments(path):
        os.utime(segment, (long_ago, long_ago))
    views = record(path, 10, retention=Retention(retain_days=1), start=False)
    assert first_seq(path) > 700  # up to the oldest kept snapshot
    assert orjson.dumps(logtools.replay(path)[0].node_views()) == orjson.dumps(views)


def test_a_log_that_starts_later_without_a_snapshot_is_refused(tmp_path):
    path = tmp_path / "log"
    record(path, 400, retention=Retention(), snapshot_every=10**6)
    (path / "snapshots").mkdir(exist_ok=True)
    for snapshot in (path / "snapshots").iterdir():
        snapshot.unlink()
    gone = list_segments(path)[:3]
    start = int(list_segments(path)[3].name[:20])
    for segment in gone:
        segment.unlink()
    missing = rf"records 1\.\.{start - 1} are missing"
    with pytest.raises(HistoryTrimmed, match=rf"starts at seq {start} and no snapshot at "
                       rf"seq {start - 1} or later anchors it: {missing}"):
        asyncio.run(FileLog(path).open())
    with pytest.raises(HistoryTrimmed, match=missing):
        logtools.verify(path)
    with pytest.raises(HistoryTrimmed, match=missing):
        logtools.replay(path)
    with pytest.raises(HistoryTrimmed, match=missing):
        asyncio.run(rebuild(LogReader(path).read, SnapshotStore(path / "snapshots")))
    for command in ("verify", "recover"):  # as an operator sees it
        done = imdispatch(command, "--log", path)
        assert done.returncode == 1
        assert f"records 1..{start - 1} are missing" in done.stderr.splitlines()[0]


def test_a_snapshot_older_than_the_first_segment_anchors_nothing(tmp_path):
    path = tmp_path / "log"
    record(path, 400, retention=Retention(keep_snapshots=1000), snapshot_every=30)
    segments = list_segments(path)
    start = int(segments[-2].name[:20])
    for segment in segments[:-2]:
        segment.unlink()
    store = SnapshotStore(path / "snapshots")
    for seq in store.seqs():
        if seq >= start - 1:
            (path / "snapshots" / f"snapshot-{seq:020d}.json").unlink()
    assert store.seqs()  # older ones are left
    with pytest.raises(HistoryTrimmed, match=rf"records 1\.\.{start - 1} are missing"):
        logtools.verify(path)
    with pytest.raises(HistoryTrimmed, match=rf"records 1\.\.{start - 1} are missing"):
        reopen(path)


def reopen(path):
    async def run():
        log = FileLog(path)
        await log.open()
        await log.close()

    asyncio.run(run())


def test_replay_before_the_anchor_is_refused_and_after_it_matches(tmp_path):
    path = tmp_path / "log"
    record(path, 600, retention=Retention(keep_snapshots=3, retain_events=50))
    anchor = logtools.history_start(path).anchor
    assert anchor is not None and first_seq(path) > 1 and anchor + 7 < 603
    with pytest.raises(BeforeHistory, match=rf"history starts after seq {anchor} \(snapshot "
                       rf"snapshot-{anchor:020d}\.json\): there is no state at seq 5"):
        logtools.replay(path, until=5)
    # the anchored replay to a later seq is the fold of the same events from the anchor
    state, _ = logtools.replay(path, until=anchor + 7)
    assert state.seq == anchor + 7
    snapshot = SnapshotStore(path / "snapshots").load(anchor)
    expected = RoutingState.from_dict(snapshot.state)
    for event in itertools.islice(LogReader(path).events(anchor), 7):
        expected.apply(event)
    assert state.to_dict() == expected.to_dict()


def test_verify_finds_a_forged_anchor(tmp_path):
    path = tmp_path / "log"
    record(path, 600, retention=Retention(keep_snapshots=2, retain_events=50))
    store = SnapshotStore(path / "snapshots")
    oldest, newest = store.seqs()
    forged = store.load(oldest)
    forged.hash = bytes(32)
    store.save(forged)  # same seq, a hash that is not the log's (keeps 2: prunes none)
    result = logtools.verify(path)
    assert result.bad_snapshots == 1
    assert result.start.anchor == newest  # the next one that fits anchors it
    assert any("hash differs" in line for line in result.snapshots)


def test_any_reader_and_snapshot_source_anchor_alike(tmp_path):
    """A reader that starts wherever its history does (as a purged stream may) and a
    snapshot source that is not a directory: the fold and the tools anchor the same."""
    path = tmp_path / "log"
    views = record(path, 600, retention=Retention(keep_snapshots=2, retain_events=50))
    start = first_seq(path)
    store = SnapshotStore(path / "snapshots")

    async def read(after):
        async for batch in LogReader(path).read(max(after, start - 1)):
            yield batch

    class Beside:  # snapshots kept elsewhere, as a stream's are
        def candidates(self, max_seq):
            return [(store.load(seq), f"object {seq}", "") for seq in reversed(store.seqs())]

    assert asyncio.run(logtools.first_seq(read)) == start
    anchored = logtools.anchors(Beside(), start)
    assert [s.seq for s, _ in anchored] == store.seqs()
    with pytest.raises(HistoryTrimmed, match=rf"records 1\.\.{start - 1} are missing"):
        asyncio.run(rebuild(read, None))  # the fold notices the history starts later
    rebuilt = asyncio.run(rebuild(read, Beside()))
    assert orjson.dumps(rebuilt.state.node_views()) == orjson.dumps(views)


def test_a_follower_keeps_reading_a_segment_dropped_under_it(tmp_path):
    path = tmp_path / "log"
    record(path, 300, retention=Retention())
    reader = LogReader(path)
    head = list(reader.records(0))
    tail = LogTail(path, 0, head[0].prev_hash)  # from seq 1, in the first segment
    list_segments(path)[0].unlink()  # as retention would, while the follower is in it
    assert [r.seq for r in tail.poll()] == [r.seq for r in head]
    tail.close()
    with pytest.raises(HistoryTrimmed, match=r"records 1\.\."):
        LogTail(path, 0, head[0].prev_hash)


# -- the commands ------------------------------------------------------------------------


def imdispatch(*args):
    return subprocess.run([sys.executable, "-m", "dispatcher", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_the_commands_say_where_a_bounded_history_starts(tmp_path):
    path = tmp_path / "log"
    views = record(path, 600, retention=Retention(keep_snapshots=2, retain_events=50))
    anchor = logtools.history_start(path).anchor
    verify = imdispatch("verify", "--log", path)
    assert verify.returncode == 0, verify.stderr
    assert f"history starts after seq {anchor} (snapshot snapshot-{anchor:020d}.json)" in (
        verify.stdout)
    assert f"seq {first_seq(path)}..603" in verify.stdout
    replay = imdispatch("replay", "--log", path, "--json")
    assert replay.returncode == 0, replay.stderr
    assert orjson.loads(replay.stdout) == orjson.loads(orjson.dumps(views))
    early = imdispatch("replay", "--log", path, "--until", 3)
    assert early.returncode == 2
    assert f"history starts after seq {anchor}" in early.stderr
    audit = imdispatch("audit", "--log", path)
    assert audit.returncode == 0, audit.stderr
    assert audit.stdout.startswith(f"history starts after seq {anchor}")
    seqs = [int(line.split()[0]) for line in audit.stdout.splitlines()[2:]]
    assert seqs == list(range(first_seq(path), 604))


# -- a real `imdispatch serve` -----------------------------------------------------------


def test_a_serve_with_bounded_history_keeps_its_disk_use_bounded(tmp_path, nats_server):
    from tests.test_dispatcher_e2e import Cluster

    class Bounded(Cluster):
        def start_dispatcher(self):
            text = self.config.read_text()
            if "retain_events" not in text:
                self.config.write_text(text.replace('fsync = "always"\n', (
                    'fsync = "always"\nsegment_bytes = 4096\nsnapshot_every = 25\n'
                    "keep_snapshots = 2\nretain_events = 60\n")))
            super().start_dispatcher()

    running = Bounded(tmp_path, nats_server.url, workers=2)
    events = tmp_path / "events"
    routing = ("id", "ip", "port", "weight", "draining")

    def nodes():
        return [{k: n[k] for k in routing} for n in running.admin("GET", "/admin/nodes")[2]]

    def changes(count):  # admin changes while the poller records its cycles
        for i in range(count):
            status, _, body = running.admin("PUT", "/admin/nodes/e2e1", {"weight": i % 9 + 1})
            assert status == 200, body

    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        changes(300)
        use, segments = disk_use(events), len(list_segments(events))
        changes(1200)
        assert first_seq(events) > 1200  # the old segments went
        assert len(list_segments(events)) <= segments + 2
        print(f"after 300 changes: {use} bytes, {segments} segments; after 1500: "
              f"{disk_use(events)} bytes, {len(list_segments(events))} segments")
        assert disk_use(events) < 1.5 * use  # 5x the events, about the same bytes
        assert len(SnapshotStore(events / "snapshots").seqs()) <= 2
        # beside the live dispatcher: verify passes from the anchor, replay agrees
        verify = imdispatch("verify", "--log", events)
        assert verify.returncode == 0, verify.stderr
        assert "history starts after seq" in verify.stdout
        replay = imdispatch("replay", "--log", events, "--json")
        assert replay.returncode == 0, replay.stderr
        live = nodes()
        assert [{k: n[k] for k in routing} for n in orjson.loads(replay.stdout)] == live
        # a restart starts from a snapshot of the bounded history, to the same state
        running.dispatcher.terminate()
        assert running.dispatcher.wait(timeout=15) == 0
        running.start_dispatcher()
        assert nodes() == live
        seqs = {running.get("/readyz")[2]["state_seq"] for _ in range(6)}
        assert len(seqs) == 1  # the follower worker folded the same bounded history
    finally:
        running.stop()


def test_a_snapshot_right_before_the_first_segment_anchors_it(tmp_path):
    from dispatcher.eventlog.snapshots import Snapshot

    path = tmp_path / "log"
    views = record(path, 300, retention=Retention(), snapshot_every=10**6)
    for name in SnapshotStore(path / "snapshots").seqs():
        (path / "snapshots" / f"snapshot-{name:020d}.json").unlink()
    segments = list_segments(path)
    start = int(segments[3].name[:20])
    state, _ = logtools.replay(path, until=start - 1)
    link = next(LogReader(path).records(start - 1)).prev_hash  # record start-1's hash
    SnapshotStore(path / "snapshots").save(Snapshot(start - 1, link, state.to_dict()))
    for segment in segments[:3]:
        segment.unlink()
    result = logtools.verify(path)
    assert (result.first_seq, result.start.anchor, result.bad_snapshots) == (start, start - 1, 0)
    assert result.records == 303 - start + 1
    assert orjson.dumps(logtools.replay(path)[0].node_views()) == orjson.dumps(views)


def test_the_retention_keys_default_to_keeping_everything_and_are_checked():
    from dispatcher import config as cfg

    defaults = Retention.of(cfg.parse("").eventlog)
    assert defaults == Retention(keep_snapshots=2, retain_events=0, retain_days=0.0)
    assert not defaults.bounded
    given = cfg.parse("[eventlog]\nkeep_snapshots = 5\nretain_events = 1000\n"
                      "retain_days = 7.5\n").eventlog
    assert Retention.of(given) == Retention(5, 1000, 7.5)
    for bad in ("keep_snapshots = 0", "keep_snapshots = 1001", "retain_events = -1",
                "retain_days = -1", 'retain_days = "7"'):
        with pytest.raises(cfg.ConfigError, match=bad.split()[0]):
            cfg.parse(f"[eventlog]\n{bad}\n")
