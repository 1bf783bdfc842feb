"""Structured logs: the formats, and what the dispatcher logs (and never logs) for real."""

import json
import logging
import sys

from imnode import logs
from tests.test_dispatcher_e2e import TOKEN, Cluster


def record(message, *args, exc_info=None, **extra):
    entry = logging.LogRecord("imdispatch.test", logging.WARNING, __file__, 1, message, args,
                              exc_info)
    for key, value in extra.items():
        setattr(entry, key, value)
    return entry


def test_json_lines_carry_the_extra_fields_and_the_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        failure = sys.exc_info()
    line = logs.JsonFormatter().format(record("node %s down", "n1", exc_info=failure,
                                              node="n1", cause="timeout"))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "node n1 down" and entry["level"] == "warning"
    assert entry["node"] == "n1" and entry["cause"] == "timeout"
    assert entry["logger"] == "imdispatch.test" and entry["time"].endswith("Z")
    assert "ValueError: boom" in entry["exception"]


def test_text_lines_are_for_people():
    line = logs.TextFormatter().format(record("node %s down", "n1", cause="timeout",
                                              reason=None))
    assert line.endswith("WARNING imdispatch.test: node n1 down [cause=timeout]")


def test_the_dispatcher_logs_each_change_once_with_its_reason_and_no_secret(
        tmp_path, nats_server):
    log_file = tmp_path / "dispatcher.log"
    running = Cluster(tmp_path, nats_server.url, log_file=log_file)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        for _ in range(50):
            running.get("/get-tcp-ip?uid=quiet")
        assert running.admin("PUT", "/admin/nodes/e2e1",
                             {"weight": 4, "reason": "more RAM"})[0] == 200
        running.nodes["e2e3"].kill()
        running.wait(lambda: running.health()["e2e3"] == "down", "e2e3 is down")
    finally:
        running.stop()
    lines = log_file.read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    events = [e for e in entries if e["logger"] == "imdispatch.events"]
    weight = [e for e in events if e["event"] == "node_weight_set"]
    assert len(weight) == 1 and weight[0]["actor"] == "admin:ops"
    assert weight[0]["reason"] == "more RAM" and weight[0]["weight"] == 4
    down = [e for e in events if e["event"] == "node_down" and e["node"] == "e2e3"]
    assert len(down) == 1 and down[0]["cause"] == "no_responders"
    assert down[0]["message"] == "node_down e2e3 by poller"
    assert not [e for e in events if e["event"] == "load_reported"]  # debug only
    text = log_file.read_text()
    assert TOKEN.split(":")[1] not in text  # the admin token is never logged
    assert "get-tcp-ip" not in text and "quiet" not in text  # no line per request


def test_an_event_is_logged_even_if_whoever_recorded_it_gave_up(tmp_path, caplog):
    import asyncio

    from dispatcher.domain import decisions
    from dispatcher.eventlog.filelog import FileLog
    from dispatcher.journal import Journal

    async def run():
        journal = Journal(FileLog(tmp_path, fsync="always"))
        await journal.open()
        events = decisions.add_node(journal.state, "n9", "10.0.0.9", 9000, 1, actor="t")
        task = asyncio.get_running_loop().create_task(journal.record(events))
        await asyncio.sleep(0)  # applied and queued; the write is under way
        task.cancel()  # an HTTP client that hung up
        await asyncio.sleep(0.2)
        await journal.close()

    caplog.set_level("INFO", logger="imdispatch.events")
    asyncio.run(run())
    assert [r.getMessage() for r in caplog.records] == ["node_added n9 by t"]


def test_odd_fields_neither_lose_the_line_nor_forge_one():
    odd = record("x", figures={1: "non-string key"}, big=10**30)
    odd.level = "an extra named like a standard key"
    entry = json.loads(logs.JsonFormatter().format(odd))
    assert entry["level"] == "warning" and entry["figures"] == {"1": "non-string key"}
    assert entry["big"] == 10**30
    line = logs.TextFormatter().format(record("weight set (%s)", "ok\nFAKE ERROR line",
                                              reason="a\nb"))
    assert "\n" not in line and "ok\\nFAKE ERROR line" in line and "reason=a\\nb" in line
