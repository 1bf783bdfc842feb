"""The file log: append, read back, reopen, rotate, lock, fsync policies."""

import asyncio
import itertools
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from dispatcher.eventlog import records
from dispatcher.eventlog.errors import LogClosed, LogCorrupted, LogLocked, UnsupportedFormat
from dispatcher.eventlog.filelog import CLEAN_MARKER, FileLog, LogReader
from dispatcher.eventlog.segments import Segment, list_segments
from tests.eventlog.helpers import entries, payloads, reopen, stamped_events, write


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
def test_round_trip_for_every_fsync_policy(tmp_path, fsync):
    events = stamped_events(300)
    log, recovery = write(tmp_path, events, fsync=fsync)
    assert recovery.last_seq == 0 and log.last_seq == 300
    assert [r.event() for r in LogReader(tmp_path).records()] == events
    assert payloads(tmp_path) == [orjson.dumps(e) for e in events]


def test_reopen_continues_sequence_and_hash_chain(tmp_path):
    first, second = stamped_events(50), stamped_events(30, start=51, seed=1)
    write(tmp_path, first)
    log, recovery = write(tmp_path, second)
    assert recovery.last_seq == 50 and recovery.torn is None
    got = list(LogReader(tmp_path).records())
    assert [r.seq for r in got] == list(range(1, 81))
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(got))
    assert got[0].prev_hash == records.GENESIS_HASH and log.last_hash == got[-1].hash


def test_read_after_a_seq_starts_there(tmp_path):
    write(tmp_path, stamped_events(100), segment_bytes=4096)
    assert [r.seq for r in LogReader(tmp_path).records(after=57)] == list(range(58, 101))
    assert list(LogReader(tmp_path).records(after=100)) == []


def test_segments_rotate_by_size_and_chain_across(tmp_path):
    events = stamped_events(400)
    write(tmp_path, events, segment_bytes=8192)
    segments = list_segments(tmp_path)
    assert len(segments) > 5
    assert all(path.stat().st_size <= 8192 for path in segments[:-1])
    assert [r.event() for r in LogReader(tmp_path).records()] == events
    _, recovery = write(tmp_path, stamped_events(10, start=401), segment_bytes=8192)
    assert recovery.last_seq == 400
    assert [r.seq for r in LogReader(tmp_path).records()][-1] == 410


def test_append_must_continue_the_sequence(tmp_path):
    async def run():
        log = FileLog(tmp_path)
        await log.open()
        try:
            with pytest.raises(ValueError, match="event seq 5 does not continue the log at 0"):
                log.append(entries(stamped_events(1, start=5)))
            assert log.last_seq == 0
        finally:
            await log.close()

    asyncio.run(run())


def test_second_writer_is_locked_out(tmp_path):
    async def run():
        log = FileLog(tmp_path)
        await log.open()
        try:
            with pytest.raises(LogLocked, match=r"open for writing by another process \(pid \d+\)"):
                await FileLog(tmp_path).open()
            other = subprocess.run(
                [sys.executable, "-c", (
                    "import asyncio, sys\n"
                    "from dispatcher.eventlog.filelog import FileLog\n"
                    f"asyncio.run(FileLog({str(tmp_path)!r}).open())\n"
                )],
                capture_output=True, text=True, timeout=60,
            )
            assert other.returncode != 0 and "LogLocked" in other.stderr
        finally:
            await log.close()
        await FileLog(tmp_path).open()  # released on close

    asyncio.run(run())


def test_appends_after_close_are_refused(tmp_path):
    async def run():
        log = FileLog(tmp_path)
        await log.open()
        await log.close()
        with pytest.raises(LogClosed):
            log.append(entries(stamped_events(1)))

    asyncio.run(run())


def test_write_failure_fails_waiters_and_later_appends(tmp_path):
    async def run():
        log = FileLog(tmp_path, fsync="always")
        await log.open()
        await log.append(entries(stamped_events(3)))
        import os

        os.close(log._fd)  # the disk goes away under the writer
        log._fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail with EBADF
        log._segment = Path(os.devnull)  # (and it is in place: this is a write failure)
        with pytest.raises(LogClosed, match="write failed"):
            await log.append(entries(stamped_events(1, start=4)))
        assert isinstance(log.failure, OSError)
        with pytest.raises(LogClosed):
            log.append(entries(stamped_events(1, start=5)))
        with pytest.raises(LogClosed):
            await log.close()

    asyncio.run(run())
    assert [r.seq for r in LogReader(tmp_path).records()] == [1, 2, 3]


def test_group_commit_shares_fsyncs(tmp_path, monkeypatch):
    syncs = []
    import os

    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))

    async def run():
        log = FileLog(tmp_path, fsync="always")
        await log.open()
        events = stamped_events(200)
        await asyncio.gather(*(log.append(entries([e])) for e in events))
        await log.close()

    asyncio.run(run())
    assert 1 <= len(syncs) < 50  # 200 concurrent appends, far fewer fsyncs
    assert len(payloads(tmp_path)) == 200


def test_newer_format_version_is_refused(tmp_path):
    write(tmp_path, stamped_events(3))
    segment = list_segments(tmp_path)[0]
    data = bytearray(segment.read_bytes())
    data[6:8] = (2).to_bytes(2, "big")
    import zlib

    data[48:52] = zlib.crc32(bytes(data[:48])).to_bytes(4, "big")
    segment.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFormat, match="version 2; this imdispatch reads version 1"):
        reopen(tmp_path)


def test_damaged_segment_header_is_corruption(tmp_path):
    write(tmp_path, stamped_events(100), segment_bytes=4096)
    middle = list_segments(tmp_path)[2]
    data = bytearray(middle.read_bytes())
    data[10] ^= 0xFF
    middle.write_bytes(bytes(data))
    with pytest.raises(LogCorrupted, match="damaged segment header") as info:
        list(LogReader(tmp_path).records())
    assert info.value.segment == middle.name


def test_missing_middle_segment_is_corruption(tmp_path):
    write(tmp_path, stamped_events(100), segment_bytes=4096)
    list_segments(tmp_path)[2].unlink()
    with pytest.raises(LogCorrupted, match="does not continue"):
        list(LogReader(tmp_path).records())


def test_unfinished_segment_header_from_a_crash_while_rotating_is_removed(tmp_path):
    write(tmp_path, stamped_events(20))
    (tmp_path / "00000000000000000021.seg").write_bytes(b"IMDLOG\x00")
    recovery, last_seq = reopen(tmp_path)
    assert last_seq == 20
    assert any("unfinished segment header" in note for note in recovery.notes)
    assert len(list_segments(tmp_path)) == 1


def test_bad_fsync_policy_and_segment_size(tmp_path):
    with pytest.raises(ValueError, match="fsync must be one of"):
        FileLog(tmp_path, fsync="sometimes")
    with pytest.raises(ValueError, match="segment_bytes"):
        FileLog(tmp_path, segment_bytes=10)


def test_clean_close_lets_the_next_open_skip_the_scan(tmp_path, monkeypatch):
    write(tmp_path, stamped_events(50), crash=False)
    assert (tmp_path / CLEAN_MARKER).exists()
    scanned = []
    real_scan = Segment.batches
    monkeypatch.setattr(
        Segment, "batches", lambda *a, **k: scanned.append(1) or real_scan(*a, **k)
    )
    _, last_seq = reopen(tmp_path)
    assert last_seq == 50 and not scanned
    # reopen() closed cleanly again; a writer that dies instead leaves no marker.
    (tmp_path / CLEAN_MARKER).unlink()
    _, last_seq = reopen(tmp_path)
    assert last_seq == 50 and len(scanned) == 1


def test_marker_of_a_changed_segment_is_ignored(tmp_path):
    write(tmp_path, stamped_events(50), crash=False)
    segment = list_segments(tmp_path)[0]
    with open(segment, "ab") as handle:
        handle.write(b"half a record")
    recovery, last_seq = reopen(tmp_path)
    assert last_seq == 50 and recovery.torn is not None


def test_damage_after_a_clean_close_is_still_found_by_replay_and_verify(tmp_path):
    from dispatcher import logtools

    write(tmp_path, stamped_events(50), crash=False)
    segment = list_segments(tmp_path)[0]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x10
    segment.write_bytes(bytes(data))
    with pytest.raises(LogCorrupted):
        logtools.verify(tmp_path)
    with pytest.raises(LogCorrupted):
        list(LogReader(tmp_path).records())
