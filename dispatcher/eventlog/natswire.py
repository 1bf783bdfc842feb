"""NATS wire shortcuts for the JetStream log's bulk paths, on a nats-py connection.

nats-py spends about 27 us publishing one message with headers and about 10 us receiving
one (it parses every header into a dict and builds a `Msg`): a ceiling near 35k records/s
either way. The log moves records in bulk, so here it writes whole `HPUB` frames in one
buffer and reads the messages of one subscription as raw bytes. Both use nats-py's
connection (its buffer, flusher, reconnects and resubscriptions) through two of its
private members, `_send_command` and `_process_msg`: checked against nats-py 2.16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

HEADER_LINE = b"NATS/1.0\r\n"
STATUS_AT = len(HEADER_LINE) - 2  # "NATS/1.0 204 EOB\r\n": a status follows the version

RawHandler = Callable[[bytes, bytes, bytes | None, bytes], None]
"""Called with (subject, reply, header block or None, data) for each message, at once."""


def header_lines(headers: dict[str, str]) -> bytes:
    """`Name: value\\r\\n` lines for a header block (values must not hold line breaks)."""
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()


def hpub(subject: bytes, reply: bytes, lines: bytes, data: bytes) -> bytes:
    """One `HPUB` frame: `lines` from `header_lines`, `reply` empty for none."""
    size = len(HEADER_LINE) + len(lines) + 2
    head = b"HPUB %s %s%d %d\r\n" % (subject, reply + b" " if reply else b"", size,
                                     size + len(data))
    return b"".join((head, HEADER_LINE, lines, b"\r\n", data, b"\r\n"))


async def send(nc: NATS, frames: bytes) -> None:
    """Write ready frames through nats-py's buffer, as its `publish` would (buffered while
    reconnecting, up to its pending limit); raises what `publish` raises."""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    if not nc.is_connected:
        limit = nc._max_pending_size
        if limit <= 0 or len(frames) + nc.pending_data_size > limit:
            raise nats.errors.OutboundBufferLimitError
    await nc._send_command(frames)
    await nc._flush_pending()


def header(block: bytes, needle: bytes) -> str | None:
    """The value of a header in a raw block; `needle` is `b"\\r\\nName:"`."""
    start = block.find(needle)
    if start < 0:
        return None
    start += len(needle)
    return block[start:block.find(b"\r\n", start)].strip().decode()


def status(block: bytes | None) -> int | None:
    """The status code of a status message (`NATS/1.0 404 ...`), None for a message."""
    if not block or block[STATUS_AT:STATUS_AT + 1] != b" ":
        return None
    code = block[STATUS_AT + 1:STATUS_AT + 4]
    return int(code) if code.isdigit() else 0


class RawSubscription:
    """A subscription whose messages reach `handler` as bytes, before nats-py parses
    them. It is an ordinary nats-py subscription (resubscribed on reconnect, counted,
    unsubscribed as usual) whose sid the connection's message hook diverts."""

    def __init__(self, nc: NATS, subject: str, handler: RawHandler) -> None:
        self.nc, self.subject, self.handler = nc, subject, handler
        self._sub: Any = None

    async def start(self) -> RawSubscription:
        self._sub = await self.nc.subscribe(self.subject, cb=_diverted)
        _routes(self.nc)[self._sub._id] = self.handler
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            _routes(self.nc).pop(self._sub._id, None)
            with contextlib.suppress(nats.errors.Error):  # closed: nothing more comes
                await self._sub.unsubscribe()
            self._sub = None


async def _diverted(msg: Msg) -> None:
    """Never called: the hook hands this subscription's messages to its handler."""


def _routes(nc: NATS) -> dict[int, RawHandler]:
    """The sids diverted on `nc`, installing the hook on its first use."""
    routes = getattr(nc, "_imd_raw_routes", None)
    if routes is None:
        routes = {}
        process = nc._process_msg

        async def process_msg(sid: int, subject: bytes, reply: bytes, data: bytes,
                              headers: bytes | None) -> None:
            handler = routes.get(sid)
            if handler is None:
                await process(sid, subject, reply, data, headers)
            else:
                handler(subject, reply, headers, data)

        nc._process_msg = process_msg
        nc._imd_raw_routes = routes
    return routes
