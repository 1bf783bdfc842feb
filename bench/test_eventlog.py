"""File event log: append throughput per fsync policy, replay throughput, 1M-event replay.

Each scenario runs once (`rounds=1`) over many events; the figures (events/s, seconds)
go to the summary table and its targets, and into the saved benchmark JSON.
"""

import asyncio
import time
from pathlib import Path

import pytest

from bench import targets
from bench.eventstream import cluster_events
from dispatcher.eventlog.filelog import CLEAN_MARKER, FileLog
from dispatcher.eventlog.records import Entry
from dispatcher.journal import Journal


async def append_all(path: Path, events, fsync: str, batch: int) -> float:
    log = FileLog(path, fsync=fsync)
    await log.open()
    started = time.perf_counter()
    for i in range(0, len(events), batch):
        await log.append([Entry.of(event) for event in events[i:i + batch]])
    await log.close()
    return time.perf_counter() - started


async def append_concurrently(path: Path, events) -> float:
    """One event per append, all in flight at once: group commit shares the fsyncs."""
    log = FileLog(path, fsync="always")
    await log.open()
    started = time.perf_counter()
    await asyncio.gather(*(log.append([Entry.of(event)]) for event in events))
    await log.close()
    return time.perf_counter() - started


@pytest.mark.parametrize(
    ("fsync", "count", "batch"),
    [("never", 200_000, 100), ("batch", 200_000, 100), ("always", 20_000, 100)],
)
def test_append(benchmark, tmp_path, fsync, count, batch):
    benchmark.group = "event log append"
    events = cluster_events(count)
    seconds = benchmark.pedantic(
        lambda: asyncio.run(append_all(tmp_path / "log", events, fsync, batch)),
        rounds=1, iterations=1,
    )
    targets.figure(f"append fsync={fsync}", count / seconds, "events/s", benchmark)


def test_append_group_commit(benchmark, tmp_path):
    benchmark.group = "event log append"
    events = cluster_events(20_000)
    seconds = benchmark.pedantic(
        lambda: asyncio.run(append_concurrently(tmp_path / "log", events)),
        rounds=1, iterations=1,
    )
    targets.figure("append fsync=always, 1 event x 20k concurrent", 20_000 / seconds,
                   "events/s", benchmark)


def written_log(path: Path, count: int) -> Path:
    asyncio.run(append_all(path, cluster_events(count), "batch", 1000))
    return path


async def open_journal(path: Path) -> Journal:
    journal = Journal(FileLog(path))
    await journal.open()
    await journal.log.close()
    return journal


@pytest.mark.parametrize("crashed", [False, True], ids=["after-clean-close", "after-crash"])
def test_replay_rate(benchmark, tmp_path, crashed):
    """Start-up from a snapshot-less log: read, verify every record, apply every event."""
    benchmark.group = "event log replay"
    count = 300_000
    path = written_log(tmp_path / "log", count)

    def replay():
        if crashed:  # no clean-shutdown marker: recovery scans the last segment first
            (path / CLEAN_MARKER).unlink(missing_ok=True)
        started = time.perf_counter()
        journal = asyncio.run(open_journal(path))
        assert journal.state.seq == count
        return time.perf_counter() - started

    seconds = benchmark.pedantic(replay, rounds=1, iterations=1)
    name = "replay rate" if not crashed else "replay rate after a crash"
    targets.figure(name, count / seconds, "events/s", benchmark)


def test_replay_one_million_events(benchmark, tmp_path):
    benchmark.group = "event log replay"
    count = 1_000_000
    path = written_log(tmp_path / "log", count)

    def replay():
        started = time.perf_counter()
        journal = asyncio.run(open_journal(path))
        assert journal.state.seq == count and len(journal.state.nodes) == 100
        return time.perf_counter() - started

    seconds = benchmark.pedantic(replay, rounds=1, iterations=1)
    targets.figure("replay 1M events", seconds, "s", benchmark)
