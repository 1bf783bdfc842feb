"""Snapshots of a cluster's routing state, kept beside its stream, so that a member joining
a long history folds only its tail.

They are objects `snapshot-<seq>` in a JetStream object store `<stream>_SNAPSHOTS` (as
many replicas as the stream), in the file snapshots' stored form
(`dispatcher.eventlog.snapshots.encode`: state, its checksum and the hash of record
`seq`). The leader writes one every `snapshot_every` events; a joining member takes the
newest that checks out and whose hash matches the stream's record, and skips the others
with a note: the stream is the truth."""

from __future__ import annotations

import contextlib
import logging
from pathlib import PurePosixPath
from typing import Any

from nats.js.errors import BucketNotFoundError, NotFoundError

from dispatcher.cluster.buckets import bind
from dispatcher.eventlog.snapshots import NAME, Snapshot, decode, encode, snapshot_name

log = logging.getLogger("imdispatch.cluster")
BUCKET_SUFFIX = "_SNAPSHOTS"


class Fetched:
    """The snapshots read from the store, as `journal.rebuild` takes them."""

    def __init__(self, found: list[tuple[Snapshot | None, PurePosixPath, str]]) -> None:
        self.found = found  # newest first

    def candidates(self, max_seq: int) -> list[tuple[Snapshot | None, PurePosixPath, str]]:
        return [(None, name, f"seq {snapshot.seq} is past the stream's end {max_seq}")
                if snapshot is not None and snapshot.seq > max_seq else (snapshot, name, problem)
                for snapshot, name, problem in self.found]


class StreamSnapshots:
    """The object store of stream `stream`'s snapshots."""

    def __init__(self, js: Any, stream: str, replicas: int) -> None:
        self.js, self.replicas = js, replicas
        self.bucket = f"{stream}{BUCKET_SUFFIX}"
        self.store: Any = None

    async def open(self) -> None:
        """Bind the store, making it if no member has yet."""
        self.store = await bind(
            lambda: self.js.object_store(self.bucket),
            lambda: self.js.create_object_store(
                self.bucket, replicas=self.replicas,
                description="imdispatch cluster: snapshots of the routing state"))

    async def names(self) -> list[str]:
        """The snapshots' object names, oldest first."""
        try:
            infos = await self.store.list(ignore_deletes=True)
        except NotFoundError:
            return []
        return sorted(info.name for info in infos if NAME.fullmatch(info.name))

    async def fetch(self, newest: int = 3) -> Fetched:
        """The `newest` snapshots, read and checked (a bad one is kept as a note)."""
        found: list[tuple[Snapshot | None, PurePosixPath, str]] = []
        for name in reversed((await self.names())[-newest:]):
            path = PurePosixPath(name)
            try:
                result = await self.store.get(name)
                found.append((decode(result.data, int(NAME.fullmatch(name).group(1))),
                              path, ""))
            except (ValueError, NotFoundError) as exc:
                found.append((None, path, f"unreadable: {exc}"))
        return Fetched(found)

    async def save(self, snapshot: Snapshot) -> None:
        """Store a snapshot (the leader drops old ones by the retention rule: `drop`)."""
        await self.store.put(snapshot_name(snapshot.seq), encode(snapshot))

    async def drop(self, seqs: list[int]) -> None:
        for seq in seqs:
            with contextlib.suppress(NotFoundError):
                await self.store.delete(snapshot_name(seq))


async def kept(log: Any) -> Fetched:
    """Every snapshot kept beside the stream of `log` (a `JetStreamLog`; none if the
    stream has no store): where replay and verify anchor a bounded history."""
    store = StreamSnapshots(log.nc.jetstream(timeout=5.0), log.stream, replicas=1)
    try:
        store.store = await store.js.object_store(store.bucket)
    except BucketNotFoundError:
        return Fetched([])
    return await store.fetch(newest=len(await store.names()))
