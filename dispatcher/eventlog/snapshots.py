"""Snapshots of the routing state, so start-up replays only the log's tail.

A snapshot is one JSON file `snapshot-<seq>.json` holding the state after event `seq`,
a SHA-256 checksum of that state (accidental damage is noticed and the snapshot skipped)
and the hash of that event's record: replay continues from `seq + 1` and checks that the
next record's chain starts from that hash, so a snapshot that does not belong to this log
is noticed (and skipped). Only `imdispatch verify`, which replays the log, proves that a
snapshot's state is the one its records build. Files are written to a temporary name,
fsynced and renamed, so a crash leaves either the old snapshot or the new one, never half.
Snapshots are written only once the log holds (fsynced) the seq they are at: a sound one
past the log's end means records were lost, and opening the log for writing refuses it.

A file that does not check out (not a JSON object, a seq that is no positive integer or
not the one its name says, a malformed hash, a state that is not an object, a name that is
not `snapshot-<20 digits>.json`) is skipped with a note: the log is the truth.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from dispatcher.eventlog.files import (
    NotRegularFile,
    read_regular,
    replace_atomically,
    require_regular,
)

SNAPSHOT_FORMAT = 1
KEEP = 2
SNAPSHOT_DIR = "snapshots"  # in the log directory
NAME = re.compile(r"snapshot-(\d{20})\.json")


def snapshot_name(seq: int) -> str:
    return f"snapshot-{seq:020d}.json"


@dataclass(slots=True)
class Snapshot:
    seq: int
    hash: bytes
    state: dict[str, Any]


class SnapshotStore:
    def __init__(self, directory: str | os.PathLike, keep: int = KEEP) -> None:
        self.directory = Path(directory)
        self.keep = keep  # the newest `keep` are kept ([eventlog] keep_snapshots)

    def save(self, snapshot: Snapshot) -> Path:
        # Not `parents=True`: a log directory removed meanwhile must not be recreated.
        self.directory.mkdir(exist_ok=True)
        path = self.directory / snapshot_name(snapshot.seq)
        replace_atomically(path, encode(snapshot), fsync=True)
        for old in self._paths()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def seqs(self) -> list[int]:
        """The seqs of the files named as snapshots, oldest first (none read)."""
        return [_name_seq(path) for path in self._paths()]

    def load(self, seq: int) -> Snapshot:
        """The snapshot at `seq`; `OSError`, `ValueError` or `NotRegularFile` if it is
        missing or does not check out."""
        return _load(self.directory / snapshot_name(seq))

    def ahead_of(self, last_seq: int) -> list[Snapshot]:
        """The sound snapshots (they check out) of states past `last_seq`."""
        found = []
        for path in self._paths():
            if _name_seq(path) > last_seq:
                try:
                    found.append(_load(path))
                except (OSError, ValueError, NotRegularFile):
                    continue  # cannot vouch for anything: skipped, as at every start
        return found

    def require_regular(self) -> None:
        """Raise `NotRegularFile` for a file named as a snapshot that is not a regular
        file (a FIFO would block whoever reads it)."""
        if self.directory.is_dir():
            for path in self.directory.glob("snapshot-*.json"):
                require_regular(path)

    def discard_after(self, last_seq: int) -> list[str]:
        """Remove snapshots of states past the log's end (left by a truncated or salvaged
        log): they can never match again, and would crowd out new snapshots."""
        removed = []
        for path in self._paths():
            if _name_seq(path) > last_seq:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    def candidates(self, max_seq: int) -> list[tuple[Snapshot | None, Path, str]]:
        """Snapshots up to `max_seq`, newest first, as (snapshot or None, path, problem);
        then files that look like snapshots but are not named as one (never used)."""
        found: list[tuple[Snapshot | None, Path, str]] = []
        for path in reversed(self._paths()):
            try:
                snapshot = _load(path)
            except (OSError, ValueError, NotRegularFile) as exc:
                found.append((None, path, f"unreadable: {exc}"))
                continue
            if snapshot.seq > max_seq:
                found.append((None, path, f"seq {snapshot.seq} is past the log's end {max_seq}"))
                continue
            found.append((snapshot, path, ""))
        if self.directory.is_dir():
            found += [(None, path, "not a snapshot name (snapshot-<20 digits>.json)")
                      for path in sorted(self.directory.glob("snapshot-*.json"))
                      if not NAME.fullmatch(path.name)]
        return found

    def _paths(self) -> list[Path]:
        """The files named as snapshots, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(path for path in self.directory.glob("snapshot-*.json")
                      if NAME.fullmatch(path.name))


def _name_seq(path: Path) -> int:
    return int(NAME.fullmatch(path.name).group(1))


def encode(snapshot: Snapshot) -> bytes:
    """A snapshot's stored form (a file here, an object beside a cluster's stream)."""
    state = orjson.dumps(snapshot.state)
    return orjson.dumps({
        "format": SNAPSHOT_FORMAT,
        "seq": snapshot.seq,
        "hash": snapshot.hash.hex(),
        "state_sha256": hashlib.sha256(state).hexdigest(),
        "state": orjson.Fragment(state),
    })


def _load(path: Path) -> Snapshot:
    """The snapshot in `path`; `ValueError` saying why if it does not check out."""
    return decode(read_regular(path), _name_seq(path))


def decode(data: bytes, named_seq: int) -> Snapshot:
    """A stored snapshot whose name says it is at `named_seq`; `ValueError` saying why
    if it does not check out."""
    raw = orjson.loads(data)
    if not isinstance(raw, dict):
        raise ValueError(f"a JSON {type(raw).__name__}, not an object")
    if raw.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"format {raw.get('format')!r} is not {SNAPSHOT_FORMAT}")
    seq, digest, state = raw.get("seq"), raw.get("hash"), raw.get("state")
    if type(seq) is not int or seq < 1:
        raise ValueError(f"seq {seq!r} is not a positive integer")
    if seq != named_seq:
        raise ValueError(f"seq {seq} is not the one its name says")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"hash {digest!r} is not 64 hex digits")
    if not isinstance(state, dict):
        raise ValueError("its state is not a JSON object")
    if hashlib.sha256(orjson.dumps(state)).hexdigest() != raw.get("state_sha256"):
        raise ValueError("the state does not match its checksum")
    return Snapshot(seq, bytes.fromhex(digest), state)
