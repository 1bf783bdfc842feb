"""Building and reading file logs in tests."""

import asyncio
import random
from pathlib import Path

from dispatcher.domain import events as ev
from dispatcher.eventlog.filelog import CLEAN_MARKER, FileLog, LogReader
from dispatcher.eventlog.records import Entry


def stamped_events(count: int, start: int = 1, seed: int = 0) -> list[ev.Event]:
    """Events with consecutive seqs and varied sizes that fold into a routing state: the
    first 50 add nodes, the rest report load, mark nodes down or reload the config.

    Each event depends only on (seed, seq), so a writer restarted at any seq goes on with
    the same events.
    """
    out: list[ev.Event] = []
    for seq in range(start, start + count):
        rng = random.Random(f"{seed}-{seq}")
        node = f"node-{rng.randrange(50)}"
        choice = rng.random()
        if seq <= 50:
            event = ev.NodeAdded(node=f"node-{seq - 1}", ip="10.0.0.1", port=9000 + seq,
                                 weight=rng.randint(1, 9))
        elif choice < 0.7:
            event = ev.LoadReported(node=node, connections=rng.randrange(10**6), capacity=10**6)
        elif choice < 0.9:
            event = ev.NodeDown(node=node, cause="timeout", detail="x" * rng.randrange(300))
        else:
            config = {"nodes": [{"id": f"n{i}", "weight": i} for i in range(rng.randrange(40))]}
            event = ev.ConfigReloaded(source="test.toml", config=config)
        event.seq, event.time, event.actor = seq, 1_800_000_000.0 + seq, "test"
        out.append(event)
    return out


def entries(events: list[ev.Event]) -> list[Entry]:
    """The events encoded as the journal hands them to a log."""
    return [Entry.of(event) for event in events]


def write(path, events, *, batch: int = 17, crash: bool = True, **options):
    """Append `events` to the log at `path` in batches; return the log and its recovery.

    With `crash` (the default), the clean-shutdown marker is removed afterwards, as if the
    writer had died: the next open then runs the recovery scan that the tests examine.
    """

    async def run():
        log = FileLog(path, **options)
        recovery = await log.open()
        for i in range(0, len(events), batch):
            await log.append(entries(events[i:i + batch]))
        await log.close()
        if crash:
            (Path(path) / CLEAN_MARKER).unlink(missing_ok=True)
        return log, recovery

    return asyncio.run(run())


def reopen(path, **options):
    """Open for writing (which recovers) and close again; return the recovery report."""

    async def run():
        log = FileLog(path, **options)
        try:
            return await log.open(), log.last_seq
        finally:
            await log.close()

    return asyncio.run(run())


def payloads(path) -> list[bytes]:
    return [record.payload for record in LogReader(path).records()]
