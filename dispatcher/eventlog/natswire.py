"""NATS wire shortcuts for the JetStream log's bulk paths, on a nats-py connection.

nats-py spends about 27 us publishing one message with headers and about 10 us receiving
one (it parses every header into a dict and builds a `Msg`): a ceiling near 35k records/s
either way. The log moves records in bulk, so here it writes whole `HPUB` frames in one
buffer and reads the messages of one subscription as raw bytes: whole frames for such a
subscription are split off before nats-py's parser sees them (`_frames`, compiled), and
the parser's own dispatch hands it the rest. All of it uses nats-py's connection (its
buffer, flusher, reconnects and resubscriptions) through its private members
`_send_command`, `_process_msg` and `_ps` (the parser): checked against nats-py 2.16.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.protocol.parser import AWAITING_MSG_PAYLOAD, CRLF_SIZE

import core_ext

HEADER_LINE = b"NATS/1.0\r\n"
STATUS_AT = len(HEADER_LINE) - 2  # "NATS/1.0 204 EOB\r\n": a status follows the version

split_frames = core_ext.compiled_or_twin(
    "dispatcher.eventlog._frames", "dispatcher.eventlog._frames_py"
).split_frames

RawHandler = Callable[[bytes, bytes, bytes | None, bytes], None]
"""Called with (subject, reply, header block or None, data) for each message, at once.
What it raises loses that message only (and is logged): raised into nats-py's parser, it
would end the connection's reading for good."""
log = logging.getLogger(__name__)


def _dropped(exc: Exception) -> None:
    log.warning("a message for a raw subscription was dropped: its handler raised %r", exc)


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


def header(block: bytes | None, needle: bytes) -> str | None:
    """The value of a header in a raw block; `needle` is `b"\\r\\nName:"`. Bytes that
    are not UTF-8 come back as U+FFFD, for the caller to refuse."""
    start = block.find(needle) if block else -1
    if start < 0:
        return None
    start += len(needle)
    end = block.find(b"\r\n", start)
    return block[start:end if end >= 0 else len(block)].strip().decode(errors="replace")


def is_status(block: bytes | None) -> bool:
    """Is this a status message (`NATS/1.0 100 ...`, `NATS/1.0 404 ...`), not a message?"""
    return block is not None and block[STATUS_AT:STATUS_AT + 1] == b" "


def status(block: bytes | None) -> int | None:
    """The status code of a status message (`NATS/1.0 404 ...`), None for a message."""
    if not is_status(block):
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


class _Done:
    """Already awaited: what the hook gives the parser for a diverted message."""

    __slots__ = ()

    def __await__(self) -> Iterator[None]:
        return _NOTHING


_DONE, _NOTHING = _Done(), iter(())


async def _diverted(msg: Msg) -> None:
    """Never called: the hook hands this subscription's messages to its handler."""


def _routes(nc: NATS) -> dict[int, RawHandler]:
    """The sids diverted on `nc`, installing the hooks on its first use: one in nats-py's
    message dispatch, and one before its parser that hands whole frames of diverted sids
    to their handlers without parsing them the slow way."""
    routes = getattr(nc, "_imd_raw_routes", None)
    if routes is None:
        routes = {}
        process = nc._process_msg

        def process_msg(sid: int, subject: bytes, reply: bytes, data: bytes,
                        headers: bytes | None) -> Awaitable[None]:
            handler = routes.get(sid)
            if handler is None:
                return process(sid, subject, reply, data, headers)
            try:
                handler(subject, reply, headers, data)
            except Exception as exc:
                _dropped(exc)
            return _DONE  # no coroutine per message: the parser awaits each one

        nc._process_msg = process_msg
        nc._ps.parse = _FramesFirst(nc._ps, routes).parse
        nc._imd_raw_routes = routes
    return routes


class _FramesFirst:
    """nats-py's parser with `split_frames` before it. The parser keeps what it has not
    used in its buffer: a message waiting for the rest of its payload gets exactly that
    first; a partial control line is taken back and read again with what arrives."""

    def __init__(self, parser: Any, routes: dict[int, RawHandler]) -> None:
        self.parser, self.routes, self.inner = parser, routes, parser.parse

    async def parse(self, data: bytes = b"") -> None:
        parser = self.parser
        if not self.routes or type(data) is not bytes:
            return await self.inner(data)
        if parser.state == AWAITING_MSG_PAYLOAD:
            missing = parser.needed + CRLF_SIZE - len(parser.buf)
            await self.inner(data[:missing])
            data = data[missing:]
            if parser.state == AWAITING_MSG_PAYLOAD:
                return None  # still not whole
        if parser.buf:
            data = bytes(parser.buf) + data
            parser.buf.clear()
        used = split_frames(data, self.routes, _dropped)
        if used < len(data):
            await self.inner(data[used:] if used else data)
