"""An event log that cannot be opened for writing stops `imdispatch serve` before any
worker starts, with one line naming the file and exit code 2 (not a worker's traceback,
not a hang): a LOCK that is a directory, a segment that cannot be opened for writing
(immutable), a corrupted log, a file of the log that is a FIFO, a log directory that other
users can change. Real `imdispatch serve` processes, with one worker and with two."""

import asyncio
import os
import signal
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
    process = subprocess.Popen([sys.executable, "-m", "dispatcher", "serve", "--config",
                                str(config), "--log-level", "warning"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # it hangs, or serves: stop it and its workers
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"serve did not refuse within 30 s: {out}{err}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


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


def fifo(path):
    """`path`, a file of the log, replaced by a named pipe: opened, it would block."""
    path.unlink()
    os.mkfifo(path)
    return f"{path} is a named pipe (FIFO), not a regular file"


def clean_marker_is_a_fifo(events):
    make_log(events)
    return fifo(events / CLEAN_MARKER)


def lock_is_a_fifo(events):
    make_log(events)
    return fifo(events / "LOCK")


def segment_is_a_fifo(events):
    return fifo(make_log(events))


def snapshot_is_a_fifo(events):
    make_log(events)
    snapshot = events / "snapshots" / "snapshot-00000000000000000001.json"
    snapshot.parent.mkdir()
    snapshot.touch()
    return fifo(snapshot)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fault", [lock_is_a_directory, immutable_segment, corrupted,
                                   clean_marker_is_a_fifo, lock_is_a_fifo, segment_is_a_fifo,
                                   snapshot_is_a_fifo])
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


NOBODY = 65534


def loose(mode):
    def fault(events):
        events.chmod(mode)
        return f"{events} is writable by other users (mode {mode:04o}): chmod go-w {events}"
    return fault


def owned_by_nobody(events):
    os.chown(events, NOBODY, NOBODY)
    return f"{events} belongs to nobody (uid {NOBODY}), not to root (uid 0)"


def segment_left_writable(events):  # what the old code made at umask 000
    segment = make_log(events)
    segment.chmod(0o666)
    return f"{segment} is writable by other users (mode 0666): chmod go-w {segment}"


def snapshots_left_writable(events):
    make_log(events)
    (events / "snapshots").mkdir(mode=0o777)
    (events / "snapshots").chmod(0o777)  # whatever the umask
    return f"{events / 'snapshots'} is writable by other users (mode 0777)"


def parent_writable_by_others(events):
    events.parent.chmod(0o777)  # without the sticky bit: others could swap `events`
    return f"{events.parent} (above {events}) is writable by other users (mode 0777)"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to nobody)")
@pytest.mark.parametrize("fault", [loose(0o777), loose(0o770), owned_by_nobody,
                                   segment_left_writable, snapshots_left_writable,
                                   parent_writable_by_others],
                         ids=["0777", "0770", "nobody", "segment", "snapshots", "parent"])
def test_a_log_directory_other_users_can_change_is_refused(tmp_path, fault):
    """Root would write STATUS and the write probe through links they plant, trust a LOCK
    they rewrite, serve admin commands on a socket they swap in: it does not start."""
    events = tmp_path / "events"
    events.mkdir()
    expected = fault(events)
    before = sorted(path.name for path in events.iterdir())
    try:
        result = serve(tmp_path, 2)
    finally:
        tmp_path.chmod(0o700)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"imdispatch serve: {tmp_path / 'dispatcher.toml'}: [eventlog] "
                           "path: ") and expected in line, line
    assert sorted(path.name for path in events.iterdir()) == before  # no LOCK, no probe


def test_the_write_probe_never_follows_a_link(tmp_path):
    """The start-up check writes a new file of its own (O_EXCL), never through a link
    found at its name: the file a link at `.write-probe` names keeps its content."""
    events = tmp_path / "events"
    victim = tmp_path / "victim.toml"
    victim.write_text("important = true\n")
    expected = lock_is_a_directory(events)  # so that serve stops right after the probe
    (events / ".write-probe").symlink_to(victim)
    result = serve(tmp_path, 1)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert victim.read_text() == "important = true\n"
    assert [path.name for path in events.glob(".write-probe*")] == [".write-probe"]
