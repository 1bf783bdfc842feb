"""Faults in the event log of a running dispatcher, injected into real processes: its
directory removed or moved away, damage found after a clean stop, odd snapshot files, a
second `imdispatch serve` on the same log. Nothing acknowledged is lost, nothing is
acknowledged that the log does not hold, and there is never a second writer."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dispatcher.eventlog.filelog import CLEAN_MARKER
from dispatcher.runtime import TAKEOVER_INTERVAL
from tests.nats_server import free_port
from tests.test_dispatcher_e2e import Cluster


def imdispatch(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "dispatcher", *args], capture_output=True,
                          text=True, timeout=timeout)


def weight(running, node="e2e1"):
    return {n["id"]: n["weight"] for n in running.admin("GET", "/admin/nodes")[2]}[node]


def test_a_removed_log_directory_fails_the_log_and_no_worker_starts_another(
        tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url, workers=2)
    events = tmp_path / "events"
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "nodes are up")
        assert running.admin("PUT", "/admin/nodes/e2e1", {"weight": 4})[0] == 200
        shutil.rmtree(events)  # an operator's mistake, while it serves
        for weight_now in (5, 6, 7, 8):  # whichever worker answers: refused, not "200"
            status, _, body = running.admin("PUT", "/admin/nodes/e2e1", {"weight": weight_now})
            assert status == 503, body
            assert "event log" in body["error"]
        failed = {}

        def leader_says_failed():  # within a second: at its next write or idle check
            answer = running.get("/readyz")  # (the PUTs may all have met the follower)
            if answer[2]["role"] == "leader" and answer[0] == 503:
                failed.update(status=answer[0], **answer[2])
            return bool(failed)

        running.wait(leader_says_failed, "the leader says its log failed", timeout=5)
        assert failed["status"] == 503 and failed["event_log"] == "failed"
        assert "no longer the file this process writes" in failed["reason"]
        # The follower must not recreate the log and lead beside the failed leader.
        quiet_until = time.monotonic() + 3 * TAKEOVER_INTERVAL + 0.5
        while time.monotonic() < quiet_until:
            assert not events.exists(), "a worker made a new log where the old one was"
            time.sleep(0.05)
        assert running.dispatcher.poll() is None
    finally:
        running.stop()


def test_a_log_directory_moved_away_is_noticed_while_idle(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url)
    events, moved = tmp_path / "events", tmp_path / "events.moved"
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "nodes are up")
        assert running.admin("PUT", "/admin/nodes/e2e1", {"weight": 4})[0] == 200
        os.rename(events, moved)  # no write follows: the writer's own check finds it
        running.wait(lambda: running.get("/readyz")[2]["event_log"] == "failed",
                     "the dispatcher says its log failed", timeout=5)
        status, _, ready = running.get("/readyz")
        assert status == 503 and str(events) in ready["reason"]
        status, _, body = running.admin("PUT", "/admin/nodes/e2e1", {"weight": 9})
        assert status == 503, body
        assert running.get("/get-tcp-ip")[0] == 200  # clients still get the last state
    finally:
        running.stop()
    assert not events.exists()  # nothing was written where the log used to be
    assert not (moved / CLEAN_MARKER).exists()  # a failed log is not "closed cleanly"
    verify = imdispatch("verify", "--log", str(moved))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    replay = json.loads(imdispatch("replay", "--log", str(moved), "--json").stdout)
    assert {n["id"]: n["weight"] for n in replay}["e2e1"] == 4  # what was acknowledged


def stopped_after_one_change(tmp_path, nats_server):
    """A dispatcher that recorded weight 7 for e2e1 and stopped cleanly; (it, its log)."""
    running = Cluster(tmp_path, nats_server.url)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "nodes are up")
        assert running.admin("PUT", "/admin/nodes/e2e1", {"weight": 7})[0] == 200
    finally:
        running.stop()
    return running, tmp_path / "events"


def test_damage_after_a_clean_stop_stays_refused_until_salvaged(tmp_path, nats_server):
    running, events = stopped_after_one_change(tmp_path, nats_server)
    assert running.dispatcher.returncode == 0 and (events / CLEAN_MARKER).exists()
    segment = sorted(events.glob("*.seg"))[-1]
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # in the last record, which the clean stop proved whole
    segment.write_bytes(data)
    os.utime(segment)
    for attempt in range(2):  # refused every time, not truncated the second time
        start = imdispatch("serve", "--config", str(running.config), timeout=30)
        assert start.returncode != 0, f"start {attempt + 1} accepted the damaged log"
        assert "event log corrupted" in start.stderr
        assert segment.read_bytes() == data
    check = imdispatch("recover", "--log", str(events))
    assert check.returncode == 1 and "--salvage" in check.stderr
    salvage = imdispatch("recover", "--log", str(events), "--salvage")
    assert salvage.returncode == 0, salvage.stderr
    assert "salvaged" in salvage.stdout
    try:
        running.start_dispatcher()  # the operator said so: it starts
        assert running.dispatcher.poll() is None
    finally:
        running.stop()


def serve_refusal(config):
    """What a real `imdispatch serve` says when it refuses to start; one that starts is
    stopped (it and its workers) and fails the test."""
    process = subprocess.Popen([sys.executable, "-m", "dispatcher", "serve", "--config",
                                str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        raise AssertionError("serve started on a log that lost its records") from None
    assert process.returncode == 2, err
    return err


@pytest.mark.parametrize("how", ["emptied", "cut-in-its-header", "emptied-no-marker"])
def test_a_truncated_only_segment_is_damage_not_a_crash_while_rotating(
        tmp_path, nats_server, how):
    """After a clean stop, the only segment cut below a header's size: the CLEAN marker
    (and the snapshot of the state at the log's end) prove records were lost. Start is
    refused; nothing is removed until `recover --salvage` is asked for."""
    running, events = stopped_after_one_change(tmp_path, nats_server)
    [segment] = sorted(events.glob("*.seg"))
    snapshots = sorted((events / "snapshots").glob("snapshot-*.json"))
    assert snapshots and (events / CLEAN_MARKER).exists()
    with open(segment, "r+b") as handle:
        handle.truncate(10 if how == "cut-in-its-header" else 0)
    if how == "emptied-no-marker":  # a crash, then the damage: the snapshot proves it
        (events / CLEAN_MARKER).unlink()
    for _ in range(2):  # refused every time: nothing was removed the first time
        [line] = serve_refusal(running.config).splitlines()
        assert line.startswith(f"imdispatch serve: {running.config}: [eventlog] path: "
                               "event log corrupted: "), line
        assert "were lost" in line, line
        assert f"imdispatch recover --log {events} --salvage" in line
        assert sorted(events.glob("*.seg")) == [segment]
        assert sorted((events / "snapshots").glob("snapshot-*.json")) == snapshots
    check = imdispatch("recover", "--log", str(events))
    assert check.returncode == 1 and "--salvage" in check.stderr, check.stderr
    assert sorted((events / "snapshots").glob("snapshot-*.json")) == snapshots
    salvage = imdispatch("recover", "--log", str(events), "--salvage")
    assert salvage.returncode == 0, salvage.stderr
    assert "removed snapshot" in salvage.stdout  # what the operator asked for, said
    try:
        running.start_dispatcher()
        assert running.dispatcher.poll() is None
    finally:
        running.stop()


def test_odd_snapshot_files_are_skipped_with_a_note(tmp_path, nats_server):
    running, events = stopped_after_one_change(tmp_path, nats_server)
    snapshots = events / "snapshots"
    good = sorted(snapshots.glob("snapshot-*.json"))[-1]
    raw = json.loads(good.read_text())
    good.unlink()  # so that a start tries every odd one before replaying the log
    odd = {"00000000000000000001": [1, 2, 3]}  # valid JSON, not an object
    for seq, value in ((2, "2"), (3, -3), (4, 4.0), (5, None)):
        odd[f"{seq:020d}"] = {**raw, "seq": value}
    odd[f"{raw['seq'] + 5:020d}"] = {**raw, "seq": raw["seq"] + 5, "hash": "zz"}
    for name, content in odd.items():
        (snapshots / f"snapshot-{name}.json").write_text(json.dumps(content))
    (snapshots / "snapshot-foo.json").write_text(json.dumps(raw))
    (snapshots / f"snapshot-{raw['seq'] - 1:020d}.json").write_text(json.dumps(raw))
    verify = imdispatch("verify", "--log", str(events))
    assert "Traceback" not in verify.stderr
    assert verify.returncode == 1  # it reports them, each by name
    for name in [*odd, "foo"]:
        assert f"snapshot-{name}.json" in verify.stdout
    assert f"snapshot-{raw['seq'] - 1:020d}.json: unreadable: seq" in verify.stdout
    recover = imdispatch("recover", "--log", str(events))
    assert recover.returncode == 0 and "Traceback" not in recover.stderr, recover.stderr
    past_end = f"snapshot-{raw['seq'] + 5:020d}.json"
    assert f"removed snapshot {past_end}: past the log's end" in recover.stdout
    log_file = tmp_path / "dispatcher.log"
    running.log_file = log_file
    try:
        running.start_dispatcher()
        assert weight(running) == 7  # the state the log holds
    finally:
        running.stop()
    notes = log_file.read_text()
    for name in ["00000000000000000001", "00000000000000000002", "00000000000000000003",
                 "00000000000000000004", "00000000000000000005", "foo"]:
        assert f"skipped snapshot snapshot-{name}.json" in notes
    assert "state rebuilt from an empty state" in notes  # from the log alone


def test_a_second_serve_on_the_same_log_is_refused(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url, workers=2)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "nodes are up")
        leader = (tmp_path / "events" / "LOCK").read_text().split()[0]
        other = tmp_path / "other.toml"
        other.write_text(running.config.read_text().replace(
            f"port = {running.http_port}\n", f"port = {free_port()}\n", 1))
        second = subprocess.Popen([sys.executable, "-m", "dispatcher", "serve", "--config",
                                   str(other)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, err = second.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGKILL)  # its workers too
            second.wait()
            raise AssertionError("a second serve runs on the same log") from None
        assert second.returncode == 2
        assert err.strip() == (f"imdispatch serve: {other}: [eventlog] path: "
                               f"{tmp_path / 'events'} is in use by another dispatcher "
                               f"(pid {leader})")
        assert running.admin("PUT", "/admin/nodes/e2e1", {"weight": 5})[0] == 200
    finally:
        running.stop()
