"""An event log that cannot be opened for writing stops `imdispatch serve` before any
worker starts, with one line naming the file and exit code 2 (not a worker's traceback):
a LOCK that is a directory, a segment that cannot be opened for writing (immutable), a
corrupted log. Real `imdispatch serve` processes, with one worker and with two."""

import asyncio
import os
import subprocess
import sys

import pytest

from dispatcher.domain import decisions
from dispatcher.eventlog.filelog import CLEAN_MARKER, FileLog
from dispatcher.journal import Journal
from tests.nats_server import free_port


def make_log(path):
    """A log with one node added, closed cleanly (CLEAN marker, snapshot)."""

    async def record():
        journal = Journal(FileLog(path))
        await journal.open()
        await journal.record(decisions.add_node(journal.state, "n1", "127.0.0.1", 9001,
                                                actor="config"))
        await journal.close()

    asyncio.run(record())
    [segment] = sorted(path.glob("*.seg"))
    return segment


def serve(tmp_path, workers):
    config = tmp_path / "dispatcher.toml"
    config.write_text(
        f"[http]\nhost = \"127.0.0.1\"\nport = {free_port()}\nworkers = {workers}\n"
        f'[nats]\nservers = ["nats://127.0.0.1:{free_port()}"]\n'
        f'[eventlog]\npath = "{tmp_path / "events"}"\n'
        '[[nodes]]\nid = "n1"\nip = "127.0.0.1"\nport = 9001\n')
    return subprocess.run([sys.executable, "-m", "dispatcher", "serve", "--config",
                           str(config), "--log-level", "warning"],
                          capture_output=True, text=True, timeout=60)


def lock_is_a_directory(events):
    make_log(events)
    (events / "LOCK").unlink()
    (events / "LOCK").mkdir()
    return f"cannot open {events / 'LOCK'} for writing: Is a directory"


def immutable_segment(events):
    segment = make_log(events)
    result = subprocess.run(["chattr", "+i", str(segment)], capture_output=True)
    if result.returncode != 0:  # not on this filesystem: a directory fails the open too
        segment.unlink()
        segment.mkdir()
        return f"cannot open {segment} for writing: Is a directory"
    return f"cannot open {segment} for writing: Operation not permitted"


def corrupted(events):
    segment = make_log(events)
    assert (events / CLEAN_MARKER).exists()
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # in the last record, which the clean stop proved whole
    segment.write_bytes(data)
    return f"event log corrupted in {segment}"


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fault", [lock_is_a_directory, immutable_segment, corrupted])
def test_a_log_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path, workers, fault):
    events = tmp_path / "events"
    events.mkdir()
    expected = fault(events)
    before = {path.name: path.stat().st_mtime_ns for path in events.iterdir()}
    try:
        result = serve(tmp_path, workers)
    finally:
        for path in events.glob("*.seg"):
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("imdispatch serve: ") and expected in line, line
    assert "imdispatch serving" not in result.stdout  # no worker was started
    after = {path.name: path.stat().st_mtime_ns for path in events.iterdir()
             if path.name != "LOCK"}
    assert after == {name: when for name, when in before.items() if name != "LOCK"}


def test_a_corrupted_log_says_how_to_look_and_how_to_salvage(tmp_path):
    events = tmp_path / "events"
    events.mkdir()
    corrupted(events)
    line = serve(tmp_path, 1).stderr.strip()
    assert f"imdispatch verify --log {events}" in line
    assert f"imdispatch recover --log {events} --salvage" in line


def test_a_torn_tail_is_left_for_the_writer_to_cut_and_report(tmp_path):
    """The supervisor's check changes no record: the leader cuts a torn tail and says
    so, as it always did."""
    events = tmp_path / "events"
    segment = make_log(events)
    os.unlink(events / CLEAN_MARKER)  # a crash, not a clean stop
    with open(segment, "ab") as handle:
        handle.write(b"\x00\x01\x02")  # half a record header: the unfinished write
    size = segment.stat().st_size
    FileLog(events).check()
    assert segment.stat().st_size == size
