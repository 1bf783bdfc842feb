"""Per-worker figures for /metrics and the dashboard, kept in plain Python numbers.

The hot path only adds to dicts and one histogram; prometheus_client is used when a scrape
asks (see `dispatcher.metrics`), not per request. Several workers share their figures the
way prometheus_client's multiprocess mode does, through files: every second each worker
writes its totals to `worker-<pid>.json` in a directory the supervisor made for this run
(`$IMDISPATCH_STATS_DIR`), and whichever worker answers a scrape adds up all the files.
A worker's figures from before its last write are what the others see (at most a second
old). Files of workers that died stay: counters never go back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from imnode.tasks import cancel_and_wait

DIRECTORY_VARIABLE = "IMDISPATCH_STATS_DIR"
LATENCY_BOUNDS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                  0.1, 0.5)
POLL_BOUNDS = (1e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5)
FSYNC_BOUNDS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 1.0)
HISTOGRAMS = {"latency": LATENCY_BOUNDS, "poll_cycle": POLL_BOUNDS, "fsync": FSYNC_BOUNDS}
HISTORY_SECONDS = 300  # assignments per node per second kept for the dashboard's chart
WRITE_EVERY = 1.0


class Histogram:
    """Counts per bucket (the last one is +Inf) and the sum, in seconds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def as_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


class WorkerStats:
    """What one worker counted since it started."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}  # (route, status) -> count
        self.assignments: dict[str, int] = {}  # node -> clients handed to it (any way)
        self.nats_assignments: dict[str, int] = {}  # node -> those picked over NATS
        self.refusals: dict[tuple[str, str], int] = {}  # (via, reason) -> picks refused
        self.latency = Histogram(LATENCY_BOUNDS)  # get-tcp-ip handler time
        self.poll_cycle = Histogram(POLL_BOUNDS)  # the leader's
        self.fsync = Histogram(FSYNC_BOUNDS)  # the leader's
        self.poll_failures: dict[str, int] = {}  # the leader's, by cause
        self.appended: Callable[[], int] = lambda: 0  # events this worker appended (leader)
        self.history: deque[tuple[int, dict[str, int]]] = deque(maxlen=HISTORY_SECONDS)
        self._last_assignments: dict[str, int] = {}

    def request(self, route: str, status: int) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def picked(self, node_id: str | None, seconds: float, reason: str = "no_node") -> None:
        """One get-tcp-ip answer: the node chosen (200), or None (503, refused for
        `reason`), and the handler's time. Backups are not counted as assignments: the
        client may never use them."""
        if node_id is None:
            self.request("/get-tcp-ip", 503)
            self.refused(reason, "http")
        else:
            self.request("/get-tcp-ip", 200)
            self.assigned(node_id, "http")
        self.latency.observe(seconds)

    def assigned(self, node_id: str, via: str) -> None:
        """A client handed to `node_id` by a pick over `via` ("http" or "nats")."""
        self.assignments[node_id] = self.assignments.get(node_id, 0) + 1
        if via == "nats":
            self.nats_assignments[node_id] = self.nats_assignments.get(node_id, 0) + 1

    def refused(self, reason: str, via: str) -> None:
        """A pick over `via` that found no node, for `reason` (see `Serving.refusal`)."""
        key = (via, reason)
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def tick(self, now: float) -> None:
        """Once a second: the assignments of the second that passed, for the chart."""
        delta = {node: count - self._last_assignments.get(node, 0)
                 for node, count in self.assignments.items()}
        self._last_assignments = dict(self.assignments)
        self.history.append((int(now), {n: c for n, c in delta.items() if c}))

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "requests": [[route, status, count]
                         for (route, status), count in self.requests.items()],
            "assignments": dict(self.assignments),
            "nats_assignments": dict(self.nats_assignments),
            "refusals": [[via, reason, count] for (via, reason), count in self.refusals.items()],
            "latency": self.latency.as_dict(),
            "poll_cycle": self.poll_cycle.as_dict(),
            "fsync": self.fsync.as_dict(),
            "poll_failures": dict(self.poll_failures),
            "appends": self.appended(),
            "history": list(self.history),
        }


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several workers' `as_dict()`s (same shape, plus `workers`)."""
    total: dict[str, Any] = {"workers": len(parts), "requests": {}, "assignments": {},
                             "nats_assignments": {}, "refusals": {}, "poll_failures": {},
                             "appends": 0, "history": {}}
    for name in HISTOGRAMS:
        total[name] = None
    for part in parts:
        for table in ("requests", "refusals"):  # lists of [key, key, count]
            for first, second, count in part.get(table, ()):
                key = (first, second)
                total[table][key] = total[table].get(key, 0) + count
        for table in ("assignments", "nats_assignments", "poll_failures"):
            for key, count in part.get(table, {}).items():
                total[table][key] = total[table].get(key, 0) + count
        total["appends"] += part["appends"]
        for second, counts in part["history"]:
            bucket = total["history"].setdefault(second, {})
            for node, count in counts.items():
                bucket[node] = bucket.get(node, 0) + count
        for name in HISTOGRAMS:
            mine, theirs = part[name], total[name]
            if theirs is None:
                total[name] = {**mine, "counts": list(mine["counts"])}
            else:
                theirs["counts"] = [a + b for a, b in zip(theirs["counts"], mine["counts"],
                                                          strict=True)]
                theirs["sum"] += mine["sum"]
    return total


class SharedStats:
    """This worker's stats, written every second for the others, and everyone's summed."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.own = WorkerStats()
        chosen = directory or os.environ.get(DIRECTORY_VARIABLE)
        self.directory = Path(chosen) if chosen else None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self.write()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(WRITE_EVERY)
            self.own.tick(time.time())
            self.write()

    def write(self) -> None:
        self._write(self.own.as_dict())

    def _write(self, figures: dict[str, Any]) -> None:
        if self.directory is None:
            return
        path = self.directory / f"worker-{os.getpid()}.json"
        temporary = path.with_suffix(f".{threading.get_ident()}.tmp")  # loop or scrape
        with contextlib.suppress(OSError):  # a full disk must not stop serving
            temporary.write_bytes(orjson.dumps(figures))
            os.replace(temporary, path)

    def everyone(self, own: dict[str, Any]) -> dict[str, Any]:
        """All workers' figures summed. `own` is this worker's `as_dict()`, taken on the
        event loop (the counters change there); call this in a thread: it does file I/O.

        With several workers every figure comes from the files, this worker's written
        first, so that whichever worker answers, two scrapes in a row never see a
        counter go back. Files that do not parse or do not fit are skipped."""
        if self.directory is None:
            return merge([own])
        self._write(own)
        parts = []
        for path in sorted(self.directory.glob("worker-*.json")):
            with contextlib.suppress(OSError, ValueError):
                part = orjson.loads(path.read_bytes())
                if _well_formed(part):
                    parts.append(part)
        return merge(parts or [own])


def _well_formed(part: Any) -> bool:
    """A worker file this version can add up (another version's buckets do not fit)."""
    try:
        if any(part[name]["bounds"] != list(bounds) for name, bounds in HISTOGRAMS.items()):
            return False
        merge([part])
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return True
