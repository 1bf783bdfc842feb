"""Who leads, and who is there: a JetStream KV bucket beside the stream.

The lease is the key `leader`, as ripienaar/nats-kv-leader-elect keeps it: a member takes
it by creating the key (refused while it exists), keeps it by updating it with the
revision it last wrote (refused once anyone else wrote it), and loses it when it stops
updating: the bucket's max age (the lease time) removes the key, and any member may
create it again. The value says what the leader last did (its last full poll cycle and
the seq its state had then), which is how every member knows how fresh the routing state
is. Members also keep a key `member.<id>` fresh, so everyone can count the live ones.

The lease decides who should lead; it is not the fence. A leader that stalls past its
lease may still believe it leads when it wakes: what stops it is the stream, where the
new leader recorded `leader_elected` first (see `dispatcher.cluster.writer`)."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import orjson
from nats.js.errors import (
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)

from dispatcher.cluster.buckets import bind

LEADER_KEY = "leader"
MEMBER_PREFIX = "member."
BUCKET_SUFFIX = "_CLUSTER"


def member_id(pid: int) -> str:
    """This worker's name in the cluster: host and pid, in the characters a KV key
    allows."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host or 'host'}-{pid}"


class Lease:
    """The lease and the member keys of one stream's cluster, as member `member`."""

    def __init__(self, js: Any, stream: str, member: str, ttl: float, replicas: int) -> None:
        self.js, self.member, self.ttl, self.replicas = js, member, ttl, replicas
        self.bucket = f"{stream}{BUCKET_SUFFIX}"
        self.kv: Any = None
        self.revision: int | None = None  # of our last write of the lease, while we hold it

    async def open(self) -> None:
        """Bind the bucket, making it if no member has yet."""
        self.kv = await bind(
            lambda: self.js.key_value(self.bucket),
            lambda: self.js.create_key_value(
                bucket=self.bucket, history=1, ttl=self.ttl, replicas=self.replicas,
                description="imdispatch cluster: the leader's lease and the live members"))

    async def acquire(self, value: dict[str, Any]) -> bool:
        """Take the lease if nobody holds it."""
        try:
            self.revision = await self.kv.create(LEADER_KEY, orjson.dumps(value))
        except KeyWrongLastSequenceError:
            return False
        return True

    async def renew(self, value: dict[str, Any]) -> bool:
        """Keep the lease (and say what the leader did); False once someone else took it.
        Other errors (no answer in time) raise: the caller's clock decides then."""
        try:
            self.revision = await self.kv.update(LEADER_KEY, orjson.dumps(value),
                                                 last=self.revision)
        except KeyWrongLastSequenceError:
            # an earlier update whose answer was lost (a timeout in an election) may have
            # landed: then the key is still ours, at a revision we did not hear of
            current, revision = await self.holder()
            if current is not None and current.get("leader") == self.member:
                self.revision = revision
                return True
            self.revision = None
            return False
        return True

    async def release(self) -> None:
        """Give the lease up at once (a clean stop), if we still hold it."""
        if self.revision is not None:
            with contextlib.suppress(Exception):
                await self.kv.delete(LEADER_KEY, last=self.revision)
            self.revision = None

    async def holder(self) -> tuple[dict[str, Any] | None, int | None]:
        """The lease's value and revision, or (None, None) when nobody holds it."""
        try:
            entry = await self.kv.get(LEADER_KEY)
        except (KeyNotFoundError, KeyDeletedError):
            return None, None
        try:
            value = orjson.loads(entry.value or b"null")
        except orjson.JSONDecodeError:
            value = None
        return (value if isinstance(value, dict) else {}), entry.revision

    async def here(self, value: dict[str, Any]) -> None:
        """Say this member is alive (for the count of members)."""
        await self.kv.put(MEMBER_PREFIX + self.member, orjson.dumps(value))

    async def members(self) -> int:
        """How many members said they were alive within the lease time (the member keys
        the bucket's max age has not removed yet). A member that stopped still counts
        until then: shares of the headroom are smaller for that long, never larger."""
        info = await self.js.stream_info(f"KV_{self.bucket}",
                                         subjects_filter=f"$KV.{self.bucket}.{MEMBER_PREFIX}>")
        return len(info.state.subjects or {})
