"""Logging for the imnode and dispatcher processes: one JSON object per line for log
collectors, or a human line for a terminal.

    configure("info", "auto")   # JSON unless stderr is a terminal

Fields passed with `extra=` (an event's figures, a node id) become keys of the JSON object
and `key=value` pairs on the human line. Nothing here logs secrets: callers never pass
tokens or passwords, and the NATS options are not logged.

Log volume is bounded whatever a client sends: a message or field is cut at `MAX_TEXT`
characters and a traceback at `MAX_TRACEBACK`, and each call site may write a burst of
`BURST` warnings or errors (any line, for libraries: Sanic logs a client's aborted request
at info), then one every `1 / REFILL` seconds; what it drops meanwhile is counted in the
`dropped` field of its next line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

MAX_TEXT = 1000  # characters of a message or a field
MAX_TRACEBACK = 4000  # characters of a traceback: its head and its tail, the error itself
BURST = 20  # warnings and errors one call site writes at once ...
REFILL = 1.0  # ... and then a second
OWN_LOGGERS = ("imdispatch", "imnode")  # their info lines are never dropped
FORMATS = ("auto", "json", "text")
LEVELS = ("debug", "info", "warning", "error")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "pid", "message", ...extra fields, "exception"}."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        entry.update((key, value) for key, value in _fields(record).items()
                     if key not in entry)  # extras after, never over, the standard keys
        if record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # an integer past 64 bits, say: the stdlib encoder takes it
            return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """One line per record (a traceback follows on its own lines); line breaks inside a
    message or a field are escaped, so nobody can forge a log line through a reason."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _one_line(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{key}={_one_line(str(value))}"
                         for key, value in _fields(record).items() if value not in (None, ""))
        if not extra:
            return line
        head, newline, rest = line.partition("\n")  # keep a traceback below the line
        return f"{head} [{extra}]{newline}{rest}"


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _cut(text: str, limit: int, tail: int = 0) -> str:
    """`text` within about `limit` characters: its head, and its last `tail` ones."""
    if len(text) <= limit:
        return text
    head = limit - tail
    return f"{text[:head]}...[{len(text) - limit} characters cut]...{text[len(text) - tail:]}"


class Bounded(logging.Filter):
    """Keeps every record short and drops floods from one call site (a client that makes
    the same error happen thousands of times a second must not fill the disk)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._sites: dict[tuple[str, int], list[float]] = {}  # [allowance, time, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        limited = record.levelno >= logging.WARNING or not record.name.startswith(OWN_LOGGERS)
        if limited and not self._allowed(record):
            return False
        message = record.getMessage()
        if len(message) > MAX_TEXT:
            record.msg, record.args = _cut(message, MAX_TEXT), None
        for key, value in _fields(record).items():
            if isinstance(value, str) and len(value) > MAX_TEXT:
                setattr(record, key, _cut(value, MAX_TEXT))
        if record.exc_info and not record.exc_text:
            record.exc_text = _cut(logging.Formatter().formatException(record.exc_info),
                                   MAX_TRACEBACK, tail=MAX_TRACEBACK // 2)
        return True

    def _allowed(self, record: logging.LogRecord) -> bool:
        site = (record.pathname, record.lineno)
        now = self._clock()
        state = self._sites.get(site)
        if state is None:
            if len(self._sites) > 10_000:  # call sites are few; bound it all the same
                self._sites.clear()
            state = self._sites[site] = [float(BURST), now, 0]
        state[0] = min(float(BURST), state[0] + (now - state[1]) * REFILL)
        state[1] = now
        if state[0] < 1.0:
            state[2] += 1
            return False
        state[0] -= 1.0
        if state[2]:
            record.dropped, state[2] = state[2], 0
        return True


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Send this process's logs to stderr at `level`, as `fmt` says (idempotent)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(Bounded())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
