"""No client can make a process write much log: lines are cut, and a call site that fires
thousands of times a second writes a burst, then a line a second saying what it dropped."""

import json
import logging
import sys

from imnode import logs


def record(message, *args, level=logging.ERROR, line=1, exc_info=None, **extra):
    entry = logging.LogRecord("sanic.error", level, "site.py", line, message, args, exc_info)
    for key, value in extra.items():
        setattr(entry, key, value)
    return entry


def test_a_huge_message_field_and_traceback_make_one_short_line():
    try:
        raise ValueError("bad url " + "\x01" * 100_000)
    except ValueError:
        failure = sys.exc_info()
    entry = record("invalid url %r", "\x01" * 50_000, exc_info=failure, url="u" * 50_000)
    assert logs.Bounded().filter(entry)
    line = logs.JsonFormatter().format(entry)
    parsed = json.loads(line)
    assert len(line) < 6 * (2 * logs.MAX_TEXT + logs.MAX_TRACEBACK) + 1000  # \u0001: 6 each
    assert len(parsed["message"]) < logs.MAX_TEXT + 50 and "characters cut" in parsed["message"]
    assert len(parsed["url"]) < logs.MAX_TEXT + 50
    assert len(parsed["exception"]) < logs.MAX_TRACEBACK + 50
    assert parsed["exception"].startswith("Traceback") and "ValueError" in parsed["exception"]
    text = logs.TextFormatter().format(entry)
    assert len(text) < len(line)


def test_one_call_site_flooding_is_cut_to_a_burst_then_a_line_a_second():
    now = [100.0]
    bounded = logs.Bounded(clock=lambda: now[0])
    passed = [bounded.filter(record("request failed")) for _ in range(10_000)]
    assert sum(passed) == logs.BURST
    assert bounded.filter(record("another site", line=2))  # other call sites are not held
    own_info = record("node up", level=logging.INFO)
    own_info.name = "imdispatch.events"
    assert all(bounded.filter(own_info) for _ in range(1000))  # nor our own info lines
    assert sum(bounded.filter(record("request stopped", level=logging.INFO, line=3))
               for _ in range(1000)) == logs.BURST  # a library's are
    now[0] += 1.0 / logs.REFILL
    again = record("request failed")
    assert bounded.filter(again) and again.dropped == 10_000 - logs.BURST
    assert not bounded.filter(record("request failed"))
