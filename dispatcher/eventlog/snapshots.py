"""Snapshots of the routing state, so start-up replays only the log's tail.

A snapshot is one JSON file `snapshot-<seq>.json` holding the state after event `seq`,
a SHA-256 checksum of that state (accidental damage is noticed and the snapshot skipped)
and the hash of that event's record: replay continues from `seq + 1` and checks that the
next record's chain starts from that hash, so a snapshot that does not belong to this log
is noticed (and skipped). Only `imdispatch verify`, which replays the log, proves that a
snapshot's state is the one its records build. Files are written to a temporary name,
fsynced and renamed, so a crash leaves either the old snapshot or the new one, never half.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

SNAPSHOT_FORMAT = 1
KEEP = 2


@dataclass(slots=True)
class Snapshot:
    seq: int
    hash: bytes
    state: dict[str, Any]


class SnapshotStore:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def save(self, snapshot: Snapshot) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"snapshot-{snapshot.seq:020d}.json"
        temporary = path.with_suffix(".tmp")
        state = orjson.dumps(snapshot.state)
        data = orjson.dumps({
            "format": SNAPSHOT_FORMAT,
            "seq": snapshot.seq,
            "hash": snapshot.hash.hex(),
            "state_sha256": hashlib.sha256(state).hexdigest(),
            "state": orjson.Fragment(state),
        })
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        for old in self._paths()[:-KEEP]:
            old.unlink(missing_ok=True)
        return path

    def discard_after(self, last_seq: int) -> list[str]:
        """Remove snapshots of states past the log's end (left by a truncated or salvaged
        log): they can never match again, and would crowd out new snapshots."""
        removed = []
        for path in self._paths():
            if int(path.stem.removeprefix("snapshot-")) > last_seq:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    def candidates(self, max_seq: int) -> list[tuple[Snapshot | None, Path, str]]:
        """Snapshots up to `max_seq`, newest first, as (snapshot or None, path, problem)."""
        found = []
        for path in reversed(self._paths()):
            try:
                raw = orjson.loads(path.read_bytes())
                if raw.get("format") != SNAPSHOT_FORMAT:
                    raise ValueError(f"format {raw.get('format')!r} is not {SNAPSHOT_FORMAT}")
                if hashlib.sha256(orjson.dumps(raw["state"])).hexdigest() != raw["state_sha256"]:
                    raise ValueError("the state does not match its checksum")
                snapshot = Snapshot(raw["seq"], bytes.fromhex(raw["hash"]), raw["state"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                found.append((None, path, f"unreadable: {exc}"))
                continue
            if snapshot.seq > max_seq:
                found.append((None, path, f"seq {snapshot.seq} is past the log's end {max_seq}"))
                continue
            found.append((snapshot, path, ""))
        return found

    def _paths(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("snapshot-*.json"))
