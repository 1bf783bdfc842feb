"""Following a log that another writer appends to, across rotations."""

import asyncio

from dispatcher.eventlog import records
from dispatcher.eventlog.filelog import FileLog, LogReader, LogTail
from tests.eventlog.helpers import entries, stamped_events


def test_tail_sees_appends_and_rotations_as_they_happen(tmp_path):
    async def run():
        log = FileLog(tmp_path, fsync="never", segment_bytes=4096)
        await log.open()
        await log.append(entries(stamped_events(10)))
        tail = LogTail(tmp_path, 4, list(LogReader(tmp_path).records())[3].hash)
        assert [r.seq for r in tail.poll()] == list(range(5, 11))
        assert tail.poll() == []
        seen = []
        for start in range(11, 200, 13):  # through several rotations
            await log.append(entries(stamped_events(13, start=start)))
            seen += [r.seq for r in tail.poll()]
        await log.close()
        assert seen == list(range(11, 11 + len(seen))) and seen[-1] == log.last_seq

    asyncio.run(run())


def test_tail_waits_for_a_record_being_written(tmp_path):
    async def run():
        log = FileLog(tmp_path, fsync="never")
        await log.open()
        await log.append(entries(stamped_events(3)))
        await log.close()

    asyncio.run(run())
    tail = LogTail(tmp_path, 0, records.GENESIS_HASH)
    segment = tail.segment
    data = segment.read_bytes()
    segment.write_bytes(data[:-5])  # the last record is half written
    assert [r.seq for r in tail.poll()] == [1, 2]
    segment.write_bytes(data)  # the writer finished it
    assert [r.seq for r in tail.poll()] == [3]
