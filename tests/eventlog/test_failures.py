"""What the log and the journal do when things go wrong: failed writes, short writes,
unstorable events, tampered snapshots, missing segments, damage after a clean close."""

import asyncio
import os
import time

import orjson
import pytest

from dispatcher import logtools
from dispatcher.domain import decisions
from dispatcher.domain import events as ev
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog import filelog
from dispatcher.eventlog.errors import LogClosed, LogCorrupted
from dispatcher.eventlog.filelog import CLEAN_MARKER, FileLog, LogReader
from dispatcher.eventlog.segments import list_segments
from dispatcher.eventlog.snapshots import SnapshotStore
from dispatcher.journal import Journal
from tests.eventlog.helpers import entries, reopen, stamped_events, write


@pytest.mark.parametrize(("fsync", "synced_first"), [("always", True), ("batch", False)])
def test_fsync_always_acknowledges_only_after_the_fsync(tmp_path, monkeypatch, fsync,
                                                        synced_first):
    order = []
    real_write, real_sync = os.write, os.fdatasync
    monkeypatch.setattr(os, "write", lambda fd, data: order.append("write") or real_write(fd, data))
    monkeypatch.setattr(os, "fdatasync", lambda fd: order.append("sync") or real_sync(fd))

    async def run():
        log = FileLog(tmp_path, fsync=fsync, fsync_interval=60)
        await log.open()
        order.clear()
        durable = log.append(entries(stamped_events(3)))
        durable.add_done_callback(lambda _: order.append("acked"))
        await durable
        await log.close()

    asyncio.run(run())
    acked = order.index("acked")
    assert ("sync" in order[:acked]) is synced_first


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    events = stamped_events(60)
    write(tmp_path, events, fsync="always")
    monkeypatch.undo()
    assert [r.event() for r in LogReader(tmp_path).records()] == events


def test_failed_rotation_fails_the_log_cleanly(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_new_segments(path, flags, *args, **options):
        if str(path).endswith(".seg") and flags & os.O_CREAT and list_segments(tmp_path):
            raise OSError(28, "No space left on device")
        return real_open(path, flags, *args, **options)

    async def run():
        log = FileLog(tmp_path, fsync="batch", segment_bytes=4096)
        await log.open()
        await log.append(entries(stamped_events(10)))
        monkeypatch.setattr(os, "open", refuse_new_segments)
        with pytest.raises(LogClosed, match="No space left"):
            await log.append(entries(stamped_events(60, start=11)))
        with pytest.raises(LogClosed):
            await log.close()
        monkeypatch.undo()

    asyncio.run(run())
    _, last_seq = reopen(tmp_path)  # the lock was released; what was written is intact
    assert last_seq >= 10
    assert [r.seq for r in LogReader(tmp_path).records()] == list(range(1, last_seq + 1))


def test_failed_deferred_fsync_does_not_spin(tmp_path, monkeypatch):
    calls = []

    def broken_sync(fd):
        calls.append(fd)
        raise OSError(5, "Input/output error")

    async def run():
        log = FileLog(tmp_path, fsync="batch", fsync_interval=0.01)
        await log.open()
        monkeypatch.setattr(os, "fdatasync", broken_sync)
        await log.append(entries(stamped_events(3)))  # written; the fsync comes later and fails
        await asyncio.sleep(0.3)
        assert isinstance(log.failure, OSError) and len(calls) <= 2
        with pytest.raises(LogClosed):
            log.append(entries(stamped_events(1, start=4)))
        with pytest.raises(LogClosed):
            await log.close()

    asyncio.run(run())


def journal(path, **options):
    return Journal(FileLog(path, fsync="always"), SnapshotStore(path / "snapshots"), **options)


def test_an_event_that_cannot_be_stored_changes_nothing(tmp_path):
    async def run():
        live = journal(tmp_path)
        await live.open()
        await live.record(decisions.add_node(live.state, "n1", "10.0.0.1", 9000, 1, actor="t"))
        unstorable = decisions.set_weight(live.state, "n1", 5, actor="t", reason="\ud800")
        with pytest.raises(TypeError):  # orjson refuses a lone surrogate
            await live.record(unstorable)
        assert live.state.seq == 1 and live.state.nodes["n1"].weight == 1
        await live.record(decisions.set_weight(live.state, "n1", 5, actor="t", reason="ok"))
        await live.close()
        return live.state.to_dict()

    final = asyncio.run(run())
    replayed = RoutingState()
    for event in LogReader(tmp_path).events():
        replayed.apply(event)
    assert replayed.to_dict() == final


def test_live_state_holds_what_the_log_holds_not_the_callers_objects(tmp_path):
    config = {"balance": {"high_watermark": 0.9, "low_watermark": 0.8}, "ports": (1, 2)}

    async def run():
        live = journal(tmp_path)
        await live.open()
        await live.record([ev.ConfigReloaded(source="t.toml", config=config)])
        config["ports"] = "changed by the caller afterwards"
        await live.close()
        return live.state.to_dict()

    final = asyncio.run(run())
    assert final["config"]["ports"] == [1, 2]  # as stored: a list, and not shared
    replayed = RoutingState()
    for event in LogReader(tmp_path).events():
        replayed.apply(event)
    assert replayed.to_dict() == final


def test_record_while_closing_is_refused(tmp_path):
    async def run():
        live = journal(tmp_path)
        await live.open()
        closing = asyncio.ensure_future(live.close())
        await asyncio.sleep(0)
        with pytest.raises(LogClosed, match="closing"):
            await live.record(decisions.add_node(live.state, "n1", "10.0.0.1", 9000, 1,
                                                 actor="t"))
        await closing
        assert live.state.seq == 0

    asyncio.run(run())


def test_failed_open_releases_the_log(tmp_path):
    write(tmp_path, stamped_events(5))
    data = bytearray(list_segments(tmp_path)[0].read_bytes())
    data[60] ^= 0xFF  # corrupt the first record; later ones are valid
    list_segments(tmp_path)[0].write_bytes(bytes(data))

    async def run():
        with pytest.raises(LogCorrupted):
            await journal(tmp_path).open()
        with pytest.raises(LogCorrupted):  # not LogLocked: the first attempt let go
            await journal(tmp_path).open()

    asyncio.run(run())


def test_tampered_snapshot_is_caught(tmp_path):
    async def run():
        live = journal(tmp_path, snapshot_every=2)
        await live.open()
        for node in ("n1", "n2", "n3"):
            await live.record(decisions.add_node(live.state, node, "10.0.0.1", 9000, 5,
                                                 actor="t"))
        await live.close()

    asyncio.run(run())
    store = SnapshotStore(tmp_path / "snapshots")
    snapshot, path, _ = store.candidates(10**9)[0]
    raw = orjson.loads(path.read_bytes())
    raw["state"]["nodes"][0]["weight"] = 9999
    path.write_bytes(orjson.dumps(raw))
    assert store.candidates(10**9)[0][0] is None  # the checksum catches plain damage
    store.save(type(snapshot)(snapshot.seq, snapshot.hash, raw["state"]))  # a forged one
    result = logtools.verify(tmp_path)
    assert result.bad_snapshots == 1
    assert any("not what the log's records build" in line for line in result.snapshots)


def test_missing_head_segments_are_corruption(tmp_path):
    write(tmp_path, stamped_events(120), segment_bytes=4096)
    list_segments(tmp_path)[0].unlink()
    with pytest.raises(LogCorrupted, match=r"records 1\.\.[0-9]+ are missing"):
        logtools.verify(tmp_path)


def test_a_directory_without_segments_is_not_a_log(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an event log"):
        list(LogReader(tmp_path).records())


def test_damaged_last_header_is_salvaged_by_dropping_that_segment(tmp_path):
    write(tmp_path, stamped_events(120), segment_bytes=4096)
    last = list_segments(tmp_path)[-1]
    first_lost = int(last.name[:20])
    data = bytearray(last.read_bytes())
    data[3] ^= 0xFF
    last.write_bytes(bytes(data))
    with pytest.raises(LogCorrupted, match="damaged segment header"):
        reopen(tmp_path)
    recovery, last_seq = reopen(tmp_path, salvage=True)
    assert last_seq == first_lost - 1 and recovery.salvaged is not None
    assert any("header is damaged" in note for note in recovery.notes)


def test_damage_in_the_last_record_after_a_clean_close_is_not_a_torn_write(tmp_path):
    write(tmp_path, stamped_events(40), crash=False, fsync="always")
    segment = list_segments(tmp_path)[0]
    time.sleep(0.01)
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0x01  # same size, so the clean marker vouches the record was whole
    segment.write_bytes(bytes(data))
    assert (tmp_path / CLEAN_MARKER).exists()
    with pytest.raises(LogCorrupted, match="checksum mismatch"):
        reopen(tmp_path)


def test_write_all_survives_partial_writes(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    filelog._write_all(fd, b"x" * 100_000)
    os.close(fd)
    assert path.stat().st_size == 100_000
