"""A cluster's event stream with a long history, written fast: for the join benchmark.

The JetStream log appends through nats-py, which spends tens of microseconds per message;
a million events would take most of a minute. Here the records (the log's own format:
`Imd-Format` and `Imd-Prev-Hash` headers, stream seq = event seq, hash-chained) go as
ready `HPUB` frames over a plain socket of their own, most of them without a reply
subject: every `ACK_EVERY`-th asks for JetStream's ack, and the writer stays at most
`WINDOW` messages ahead of the last ack (a stream stores one connection's messages in
order, so that ack covers the ones before; nats-server refuses messages past its ingest
queue's limits, which the window keeps clear of). The stream's final count is checked:
a message lost on the way fails the fill rather than leaving a gap.

The state the events build is folded here as they are made, so a snapshot at any seq can
be kept beside the stream (`StreamSnapshots.save`), as a leader does."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
import orjson

from dispatcher.cluster.member import stream_subject
from dispatcher.cluster.snapshots import StreamSnapshots
from dispatcher.domain import events as ev
from dispatcher.domain.state import RoutingState
from dispatcher.eventlog import records
from dispatcher.eventlog.jetstream import FORMAT, FORMAT_HEADER, PREV_HEADER, JetStreamLog
from dispatcher.eventlog.snapshots import Snapshot
from dispatcher.journal import stamp

ACK_EVERY = 500
WINDOW = 5000


class RawPublisher:
    """A second, bare NATS connection that writes pre-built frames; of what the server
    sends back it answers `PING` and keeps an `-ERR`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.writer: asyncio.StreamWriter | None = None
        self.error = ""  # the server's -ERR, if it sent one
        self._reader_task: asyncio.Task | None = None

    async def open(self) -> None:
        host, port = self.url.removeprefix("nats://").rsplit(":", 1)
        reader, self.writer = await asyncio.open_connection(host, int(port))
        await reader.readline()  # INFO
        self.writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
                          b'"no_responders":true,"lang":"python","version":"bench"}\r\n'
                          b"PING\r\n")
        assert (await reader.readline()).startswith(b"PONG"), "no PONG from nats-server"
        self._reader_task = asyncio.get_running_loop().create_task(self._answer(reader))

    async def _answer(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            if line.startswith(b"PING"):
                self.writer.write(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                self.error = line.decode(errors="replace").strip()

    async def send(self, frames: list[bytes]) -> None:
        if self.error:
            raise RuntimeError(f"nats-server refused the bulk writer: {self.error}")
        self.writer.write(b"".join(frames))
        await self.writer.drain()

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self.writer is not None:
            self.writer.close()


class StreamFiller:
    """Writes a cluster's stream (`stream`, as `[eventlog] stream` names it) on the NATS
    server at `url` and keeps the state its events build."""

    def __init__(self, url: str, stream: str, replicas: int = 1) -> None:
        self.url, self.stream, self.replicas = url, stream, replicas
        self.subject = stream_subject(stream).encode()
        self.state = RoutingState()
        self.hash = records.GENESIS_HASH
        self.nc: Any = None
        self.raw = RawPublisher(url)
        self._acked = 0
        self._ack_arrived = asyncio.Event()
        self._ack_error: str | None = None

    async def __aenter__(self) -> StreamFiller:
        self.nc = await nats.connect(self.url)
        js = self.nc.jetstream(timeout=10)
        await js.add_stream(JetStreamLog(self.nc, stream=self.stream,
                                         subject=self.subject.decode(),
                                         replicas=self.replicas).stream_config())
        self.inbox = self.nc.new_inbox()
        await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_ack)
        await self.raw.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.raw.close()
        await self.nc.close()

    async def _on_ack(self, msg: Any) -> None:
        reply = orjson.loads(msg.data)
        if "error" in reply:
            self._ack_error = f"{msg.subject}: {reply['error']}"
        else:
            self._acked = max(self._acked, reply["seq"])
        self._ack_arrived.set()

    def _frame(self, seq: int, payload: bytes) -> bytes:
        lines = (f"{FORMAT_HEADER}: {FORMAT}\r\n{PREV_HEADER}: {self.hash.hex()}\r\n\r\n"
                 .encode())
        head = b"NATS/1.0\r\n" + lines
        reply = b" %s.%d" % (self.inbox.encode(), seq) if seq % ACK_EVERY == 0 else b""
        self.hash = records.record_hash(seq, self.hash, payload)
        return b"HPUB %s%s %d %d\r\n%s%s\r\n" % (self.subject, reply, len(head),
                                                  len(head) + len(payload), head, payload)

    async def _send(self, frames: list[bytes], last_seq: int) -> None:
        await self.raw.send(frames)
        while last_seq - self._acked > WINDOW:
            if self._ack_error:
                raise RuntimeError(f"JetStream refused a message: {self._ack_error}")
            self._ack_arrived.clear()
            await asyncio.wait_for(self._ack_arrived.wait(), 10)

    async def record(self, events: list[ev.Event]) -> None:
        """A few events, decided and checked as the journal does (`stamp`)."""
        _, entries, error = stamp(events, self.state, records.MAX_PAYLOAD, time.time())
        if error is not None:
            raise error
        await self._send([self._frame(entry.seq, entry.payload) for entry in entries],
                         self.state.seq)

    async def loads(self, count: int, nodes: list[str]) -> None:
        """`count` load reports over `nodes` (the bulk of a real history). Each is applied
        to the state as made: it holds only ints and strings, so its decoded form is this
        very event (what `stamp` checks, at a quarter of the cost)."""
        apply, dumps, now = self.state.apply, orjson.dumps, time.time
        frames: list[bytes] = []
        for i in range(count):
            event = ev.LoadReported(node=nodes[i % len(nodes)], connections=(i * 37) % 9000,
                                    capacity=10_000, actor="poller", seq=self.state.seq + 1,
                                    time=now())
            frames.append(self._frame(event.seq, dumps(event)))
            apply(event)
            if len(frames) == ACK_EVERY:
                await self._send(frames, self.state.seq)
                frames = []
        if frames:
            await self._send(frames, self.state.seq)

    async def settle(self, timeout: float = 60.0) -> None:
        """Wait until the stream holds every record sent, and check it holds no more."""
        js = self.nc.jetstream(timeout=10)
        deadline = time.monotonic() + timeout
        while True:
            info = await js.stream_info(self.stream)
            if info.state.last_seq >= self.state.seq or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        held = (info.state.messages, info.state.first_seq, info.state.last_seq)
        assert held == (self.state.seq, 1, self.state.seq), (
            f"the stream holds (messages, first, last) {held}, not {self.state.seq} events "
            "from seq 1: messages were lost on the way")

    def snapshot(self) -> Snapshot:
        return Snapshot(self.state.seq, self.hash, self.state.to_dict())

    async def keep(self, snapshot: Snapshot) -> None:
        """Keep `snapshot` beside the stream, as the leader would."""
        snapshots = StreamSnapshots(self.nc.jetstream(timeout=10), self.stream,
                                    self.replicas)
        await snapshots.open()
        await snapshots.save(snapshot)
