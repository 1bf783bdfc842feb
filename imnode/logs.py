"""Logging for the imnode and dispatcher processes: one JSON object per line for log
collectors, or a human line for a terminal.

    configure("info", "auto")   # JSON unless stderr is a terminal

Fields passed with `extra=` (an event's figures, a node id) become keys of the JSON object
and `key=value` pairs on the human line. Nothing here logs secrets: callers never pass
tokens or passwords, and the NATS options are not logged.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import orjson

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
            entry["exception"] = self.formatException(record.exc_info)
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


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Send this process's logs to stderr at `level`, as `fmt` says (idempotent)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
