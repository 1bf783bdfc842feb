"""Crash recovery and damage detection, after Kafka's and LevelDB's log tests."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import zlib

import pytest

from dispatcher import logtools
from dispatcher.eventlog import records
from dispatcher.eventlog.errors import LogCorrupted
from dispatcher.eventlog.filelog import LogReader
from dispatcher.eventlog.segments import SEGMENT_HEADER, list_segments
from tests.eventlog.helpers import payloads, reopen, stamped_events, write

COUNT = 120


def record_offsets(path):
    """(offset, length) of each record in a single-segment log."""
    data = list_segments(path)[0].read_bytes()
    offsets, offset = [], SEGMENT_HEADER.size
    while offset < len(data):
        _, stop = records.decode(data, offset)
        offsets.append((offset, stop - offset))
        offset = stop
    return offsets


def segment(path):
    return list_segments(path)[0]


@pytest.mark.parametrize("seed", range(40))
def test_random_garbage_from_inside_a_record_to_the_end(tmp_path, seed):
    """Kafka's LogTest: overwrite from a random point inside a random record to the end."""
    rng = random.Random(seed)
    events = stamped_events(COUNT, seed=seed)
    write(tmp_path, events)
    expected = payloads(tmp_path)
    offsets = record_offsets(tmp_path)
    victim = rng.randrange(COUNT)
    start = offsets[victim][0] + rng.randrange(offsets[victim][1])
    path = segment(tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(start)
        handle.write(rng.randbytes(size - start + rng.randrange(200)))

    recovery, last_seq = reopen(tmp_path)

    assert last_seq == victim  # exactly the records before the damaged one remain
    assert payloads(tmp_path) == expected[:victim]
    assert recovery.torn is not None and recovery.torn.seq == victim + 1
    assert recovery.torn.offset == offsets[victim][0]
    assert path.stat().st_size == offsets[victim][0]
    write(tmp_path, stamped_events(5, start=victim + 1, seed=99))  # and the log goes on
    assert [r.seq for r in LogReader(tmp_path).records()] == list(range(1, victim + 6))


def test_truncated_trailing_record(tmp_path):
    write(tmp_path, stamped_events(COUNT))
    offset, length = record_offsets(tmp_path)[-1]
    os.truncate(segment(tmp_path), offset + length // 2)
    recovery, last_seq = reopen(tmp_path)
    assert last_seq == COUNT - 1
    assert recovery.torn.size == length // 2
    assert "cut short" in recovery.torn.problem
    assert f"(seq {COUNT} onwards)" in recovery.describe()[0]


def test_truncated_inside_a_header(tmp_path):
    write(tmp_path, stamped_events(COUNT))
    offset, _ = record_offsets(tmp_path)[-1]
    os.truncate(segment(tmp_path), offset + 7)
    assert reopen(tmp_path)[1] == COUNT - 1


def corrupt_middle(path, victim, edit):
    offset, length = record_offsets(path)[victim]
    data = bytearray(segment(path).read_bytes())
    edit(data, offset, length)
    segment(path).write_bytes(bytes(data))
    return offset


def flip_payload_byte(data, offset, length):
    data[offset + length - 3] ^= 0x01


def bad_length(data, offset, _length):
    data[offset + 4:offset + 8] = (40).to_bytes(4, "big")


def edit_payload_fix_crc(data, offset, length):
    """Tampering that a checksum alone cannot see: change bytes, recompute the CRC."""
    body_start = offset + 12
    payload = bytes(data[body_start + 40:offset + length])
    edited = payload.replace(b'"actor":"test"', b'"actor":"evil"')
    assert edited != payload and len(edited) == len(payload)
    data[body_start + 40:offset + length] = edited
    crc = zlib.crc32(bytes(data[body_start:offset + length]))
    data[offset + 8:offset + 12] = crc.to_bytes(4, "big")


@pytest.mark.parametrize(
    ("edit", "problem", "bad_seq"),
    [
        (flip_payload_byte, "checksum mismatch, and valid records follow", 31),
        (bad_length, "checksum mismatch, and valid records follow", 31),
        (edit_payload_fix_crc, "hash chain broken", 32),  # seen at the next record
    ],
    ids=["checksum", "bad-length", "edited-with-fixed-crc"],
)
def test_damage_followed_by_valid_records_is_corruption(tmp_path, edit, problem, bad_seq):
    write(tmp_path, stamped_events(COUNT))
    corrupt_middle(tmp_path, 30, edit)
    bad_offset = record_offsets_safe(tmp_path, bad_seq)
    with pytest.raises(LogCorrupted, match=problem) as info:
        reopen(tmp_path)
    error = info.value
    assert (error.segment, error.offset, error.seq) == (segment(tmp_path).name, bad_offset, bad_seq)
    assert f"at offset {bad_offset} (seq {bad_seq})" in str(error)
    with pytest.raises(LogCorrupted, match=problem):  # verify finds the same record
        logtools.verify(tmp_path)
    assert len(payloads_until_error(tmp_path)) == bad_seq - 1


def record_offsets_safe(path, seq):
    """The offset of record `seq`, found by framing alone (works on damaged logs)."""
    data, offset = segment(path).read_bytes(), SEGMENT_HEADER.size
    for _ in range(seq - 1):
        length = int.from_bytes(data[offset + 4:offset + 8], "big")
        offset += records.HEADER.size + length
        if length == 40:  # the bad-length edit: resynchronise on the next marker
            offset = data.find(records.MAGIC, offset)
    return offset


def payloads_until_error(path):
    got = []
    try:
        for record in LogReader(path).records():
            got.append(record)
    except LogCorrupted:
        pass
    return got


def test_salvage_keeps_the_good_prefix(tmp_path):
    write(tmp_path, stamped_events(COUNT))
    expected = payloads(tmp_path)
    corrupt_middle(tmp_path, 30, flip_payload_byte)
    recovery, last_seq = reopen(tmp_path, salvage=True)
    assert last_seq == 30
    assert recovery.salvaged.seq == 31
    assert recovery.dropped_bytes > 0
    assert "salvaged" in recovery.describe()[0]
    assert payloads(tmp_path) == expected[:30]


CHILD = textwrap.dedent("""
    import asyncio, sys
    from dispatcher.eventlog.filelog import FileLog
    from tests.eventlog.helpers import entries, stamped_events

    async def main():
        log = FileLog(sys.argv[1], fsync="always")
        recovery = await log.open()
        events = stamped_events(100_000, start=recovery.last_seq + 1)
        for i in range(0, len(events), 3):
            batch = events[i:i + 3]
            await log.append(entries(batch))
            print(batch[-1].seq, flush=True)  # acknowledged: durable from here on

    asyncio.run(main())
""")


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_loses_no_acknowledged_append(tmp_path, seed):
    rng = random.Random(seed)
    acknowledged = 0
    for _ in range(2):  # kill, restart (which recovers), kill again
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)],
            stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
        )
        try:
            for _ in range(rng.randrange(20, 400)):
                line = child.stdout.readline()
                assert line, "child stopped early"
                acknowledged = int(line)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    _recovery, last_seq = reopen(tmp_path)
    assert last_seq >= acknowledged
    assert [r.event() for r in LogReader(tmp_path).records()] == stamped_events(last_seq)
