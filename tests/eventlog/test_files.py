"""The log's own files are opened so that what is found in its directory cannot trick
the service: no write through a link, no blocking on a FIFO, no file of the log that is
not a regular one; damage the CLEAN marker proves is refused, never cut as a torn tail;
and the rule for who may change the log directory."""

import os
import stat

import pytest

from dispatcher.eventlog.errors import LogCorrupted
from dispatcher.eventlog.filelog import CLEAN_MARKER, FileLog, writer_pid
from dispatcher.eventlog.files import NotRegularFile, replace_atomically, unsafe_directory
from dispatcher.eventlog.segments import SEGMENT_HEADER, list_segments
from dispatcher.eventlog.snapshots import Snapshot, SnapshotStore
from tests.eventlog.helpers import reopen, stamped_events, write

NOBODY = 65534


def test_a_link_at_the_temporary_name_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("ORIGINAL")
    (tmp_path / "STATUS.tmp").symlink_to(victim)
    replace_atomically(tmp_path / "STATUS", b"{}", fsync=False)
    assert victim.read_text() == "ORIGINAL"
    assert (tmp_path / "STATUS").read_bytes() == b"{}"
    assert not (tmp_path / "STATUS.tmp").is_symlink()


def test_the_clean_marker_and_snapshots_are_never_written_through_a_link(tmp_path):
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_text("ORIGINAL")
    (tmp_path / "snapshots").mkdir()
    (tmp_path / f"{CLEAN_MARKER}.tmp").symlink_to(victim)
    (tmp_path / "snapshots" / "snapshot-00000000000000000007.json.tmp").symlink_to(victim)
    write(tmp_path, stamped_events(7), crash=False)
    SnapshotStore(tmp_path / "snapshots").save(Snapshot(7, b"\0" * 32, {"seq": 7}))
    assert victim.read_text() == "ORIGINAL"
    assert (tmp_path / CLEAN_MARKER).is_file()
    assert (tmp_path / "snapshots" / "snapshot-00000000000000000007.json").is_file()


@pytest.mark.parametrize("name", [CLEAN_MARKER, "LOCK", "00000000000000000001.seg"])
def test_a_file_of_the_log_that_is_a_fifo_is_refused_at_once(tmp_path, name):
    write(tmp_path, stamped_events(5), crash=False)
    (tmp_path / name).unlink()
    os.mkfifo(tmp_path / name)  # opened for reading, it would block for ever
    with pytest.raises(NotRegularFile, match=f"{tmp_path / name} is a named pipe"):
        FileLog(tmp_path).check()
    assert stat.S_ISFIFO(os.lstat(tmp_path / name).st_mode)  # and nothing was removed


def test_a_link_as_lock_is_refused_and_its_target_kept(tmp_path):
    write(tmp_path, stamped_events(5), crash=False)
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_text("ORIGINAL")
    (tmp_path / "LOCK").unlink()
    (tmp_path / "LOCK").symlink_to(victim)
    with pytest.raises(NotRegularFile, match="LOCK is a symbolic link"):
        FileLog(tmp_path).check()
    assert victim.read_text() == "ORIGINAL"  # not truncated, no pid written in it
    assert writer_pid(tmp_path) is None


def test_a_segment_cut_shorter_than_the_clean_stop_left_it_is_refused(tmp_path):
    """The marker vouches for its size: the missing bytes were whole records, not a torn
    write. Only salvaging cuts to the last whole record."""
    write(tmp_path, stamped_events(40), crash=False)
    [segment] = list_segments(tmp_path)
    size = segment.stat().st_size
    with open(segment, "r+b") as handle:
        handle.truncate(size - 50)
    with pytest.raises(LogCorrupted, match=f"is {size - 50} bytes, but the clean stop .* "
                                           f"recorded {size} bytes .* records were lost"):
        reopen(tmp_path)
    assert segment.stat().st_size == size - 50
    recovery, last_seq = reopen(tmp_path, salvage=True)
    assert last_seq < 40 and recovery.torn is not None


def test_a_segment_the_clean_stop_named_that_is_gone_is_refused(tmp_path):
    write(tmp_path, stamped_events(120), segment_bytes=4096, crash=False)
    last = list_segments(tmp_path)[-1]
    last.unlink()
    with pytest.raises(LogCorrupted, match=f"{last} is gone"):
        reopen(tmp_path)


def test_an_unfinished_first_segment_of_a_new_log_is_still_removed(tmp_path):
    """A crash while creating the very first segment: no marker, no snapshot, nothing
    lost. It is removed and the log starts afresh, as before."""
    (tmp_path / "00000000000000000001.seg").write_bytes(b"IMD")
    recovery, last_seq = reopen(tmp_path)
    assert last_seq == 0 and any("unfinished segment header" in n for n in recovery.notes)
    assert list_segments(tmp_path)[0].stat().st_size == SEGMENT_HEADER.size


def test_a_directory_only_the_service_can_change_is_safe(tmp_path):
    (tmp_path / "events" / "snapshots").mkdir(parents=True, mode=0o755)
    (tmp_path / "events" / "link").symlink_to("/etc/passwd")  # lstat mode 0777: not its
    assert unsafe_directory(tmp_path / "events", ("snapshots",)) is None
    sticky = tmp_path / "shared"  # as /tmp: others cannot move what is not theirs
    (sticky / "events").mkdir(parents=True)
    sticky.chmod(0o1777)
    assert unsafe_directory(sticky / "events") is None


def test_a_directory_others_can_change_is_named_with_its_mode(tmp_path):
    events = tmp_path / "events"
    (events / "snapshots").mkdir(parents=True)
    (events / "snapshots").chmod(0o775)
    assert unsafe_directory(events, ("snapshots",)) == (
        f"{events / 'snapshots'} is writable by other users (mode 0775): "
        f"chmod go-w {events / 'snapshots'}")
    (events / "snapshots").chmod(0o755)
    (events / "snapshots" / "snapshot-00000000000000000001.json").touch(mode=0o666)
    os.chmod(events / "snapshots" / "snapshot-00000000000000000001.json", 0o666)
    assert "snapshot-00000000000000000001.json is writable by other users (mode 0666)" in (
        unsafe_directory(events, ("snapshots",)))
    (events / "snapshots" / "snapshot-00000000000000000001.json").chmod(0o644)
    tmp_path.chmod(0o757)
    try:
        assert unsafe_directory(events).startswith(f"{tmp_path} (above {events}) is "
                                                   "writable by other users (mode 0757)")
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to nobody)")
def test_a_file_in_the_log_directory_owned_by_another_user_is_named(tmp_path):
    (tmp_path / "events").mkdir()
    planted = tmp_path / "events" / "STATUS.tmp"
    planted.symlink_to("/etc/shadow")
    os.lchown(planted, NOBODY, NOBODY)
    assert unsafe_directory(tmp_path / "events") == (
        f"{planted} belongs to nobody (uid {NOBODY}), not to root (uid 0) that the "
        f"dispatcher runs as: chown -R root {tmp_path / 'events'}")
