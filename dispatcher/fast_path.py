"""get-tcp-ip's fast path: the hottest request answered without Sanic's machinery.

`FastProtocol` owns a new connection until it sees a request it is not sure about. While
it owns it, every complete, simple `GET /get-tcp-ip` (see `core_ext._fastpath_py.scan`)
is answered from `data_received`: no task, request, router or response object. The
answer comes from the same `GetTcpIp.answer` as Sanic's route and is framed as Sanic
frames it. The first request that is anything else, and every byte after it, goes to Sanic
untouched and in order: the connection then becomes an ordinary Sanic connection (with
this module's guards, `http_server.GuardedProtocol`) for the rest of its life.

Timing rules are Sanic's and the guards': a request that arrives in several packets is
handed to Sanic as soon as it is seen incomplete, so Sanic and the guards time it (408);
a connection that sends nothing within `REQUEST_TIMEOUT` of its accept, or stays idle
for `KEEP_ALIVE_TIMEOUT`, is closed without a word, as Sanic closes it. One timer per
connection, moved only when it fires.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Any

from sanic.helpers import STATUS_CODES
from sanic.models.server_types import ConnInfo, Signal
from sanic.request import Request

import core_ext
from dispatcher.config import HttpConfig
from dispatcher.get_tcp_ip import GetTcpIp
from dispatcher.http_server import GuardedProtocol

_bytes = core_ext.compiled_or_twin("core_ext._fastpath", "core_ext._fastpath_py")
scan, plain_query, frame = _bytes.scan, _bytes.plain_query, _bytes.frame
STATUS_LINES = {status: b"HTTP/1.1 %d %b\r\n" % (status, STATUS_CODES[status])
                for status in (200, 400, 429, 500, 503)}


class FastProtocol(GuardedProtocol):
    """The public port's protocol when `[http] fast_path` is on."""

    __slots__ = ("_address", "_answers", "_began", "_fast", "_keep_alive")

    def __init__(self, *, loop: Any, app: Any, signal: Any = None, connections: Any = None,
                 state: Any = None, unix: Any = None, **_: Any) -> None:
        """Sanic's `HttpProtocol.__init__`, less what it repeated for every connection
        (set the event loop, read eight settings from the app's config: 6 us of a
        one-request connection's ~60). The settings are read once, at the first
        connection, when the server has started and they are final."""
        self.loop, self.app, self.signal = loop, app, signal or Signal()
        self.transport = self.conn_info = self._task = self.request = None
        self.connections = connections if connections is not None else set()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._data_received = asyncio.Event()
        self._unix, self._time, self.url = unix, 0.0, None
        self.state = state if state else {}
        self.state.setdefault("requests_count", 0)
        self._exception = self._callback_check_timeouts = None
        settings = app.ctx.__dict__.get("connection_settings")
        if settings is None:
            settings = app.ctx.connection_settings = _connection_settings(app)
        (self.access_log, self.request_handler, self.error_handler, self.request_timeout,
         self.response_timeout, self.keep_alive_timeout, self.request_max_size,
         self.request_class, self._keep_alive) = settings

    def connection_made(self, transport: Any) -> None:
        self.admit()
        transport.set_write_buffer_limits(low=16384, high=65536)  # as Sanic sets them
        self.connections.add(self)
        self.transport = transport
        self.recv_buffer = bytearray()
        self._fast = True
        self._answers: GetTcpIp = self.app.ctx.get_tcp_ip
        self._address: str | None = None
        self._time = self._began = monotonic()
        self._callback_check_timeouts = self.loop.call_later(self.request_timeout,
                                                             self._check_timeouts)

    def data_received(self, data: bytes) -> None:
        if not self._fast:
            return GuardedProtocol.data_received(self, data)
        buffer = self.recv_buffer
        self._time = monotonic()
        if not buffer and self._began is None:
            self._began = self._time
        buffer += data
        if self.stalled_since is None:
            self._serve()
        if self._fast and len(buffer) >= self.app.config.REQUEST_BUFFER_SIZE:
            self.transport.pause_reading()  # the client sends faster than it reads
        return None

    def _serve(self) -> None:
        """Answer the complete fast requests at the front of the buffer, in order; hand
        the connection to Sanic at the first request that is not one. All in one go, as
        Sanic answers what is buffered without yielding (a client's FIN read in between
        would close the connection under the rest), until the answers wait unsent."""
        buffer, answers, transport = self.recv_buffer, self._answers, self.transport
        if not self._fast or transport is None or transport.is_closing():
            return
        limit = self.HTTP_CLASS.HEADER_MAX_SIZE
        start = 0
        while True:
            found = scan(buffer, start, limit)
            if type(found) is int:  # not a fast request, or not all here yet
                del buffer[:start]
                if buffer:  # a request split across packets too: Sanic times it
                    if start:  # it began with the bytes just received
                        self._began = self._time
                    self._hand_over()
                else:
                    self._began = None
                    if not transport.is_reading():
                        transport.resume_reading()
                return
            start, keep_alive, query_start, query_end = found
            keep_alive = keep_alive and self._keep_alive
            if query_start == query_end or plain_query(buffer, query_start, query_end):
                query = ""
            else:
                query = buffer[query_start:query_end].decode("ascii")
            try:
                status, body, retry_after = answers.answer(
                    query, self._peer() if answers.per_address is not None else "")
            except Exception:
                status, body, retry_after = answers.failed()
            transport.write(frame(STATUS_LINES[status], retry_after, body, keep_alive))
            if not keep_alive:
                buffer.clear()
                transport.close()
                return
            if self.stalled_since is not None:  # answers pile up unread: resume_writing
                del buffer[:start]
                self._began = self._time if buffer else None
                return

    def _peer(self) -> str:
        """The client's address as Sanic's `request.ip` gives it (for the rate limit)."""
        if self._address is None:
            peer = self.transport.get_extra_info("peername")
            self._address = peer[0] if isinstance(peer, tuple) else ""
        return self._address

    def _hand_over(self) -> None:
        """From now on Sanic reads this connection, from the bytes still buffered."""
        self._fast = False
        if self._callback_check_timeouts is not None:
            self._callback_check_timeouts.cancel()
            self._callback_check_timeouts = None
        self.conn_info = ConnInfo(self.transport, unix=self._unix)
        self.conn_info.ctx.admin_side = False
        self._task = self.loop.create_task(self.connection_task())

    def request_began(self) -> float:
        return self._began if self._began is not None else monotonic()

    def _check_timeouts(self) -> None:
        """Closed, without a word as Sanic does: a connection whose first request did not
        come in time, or that stayed idle for the keep-alive time. (A request that has
        begun to arrive is Sanic's, and Sanic times it.)"""
        self._callback_check_timeouts = None
        if not self._fast or self.transport is None or self.transport.is_closing():
            return None
        if self.stalled_since is not None:  # the guards' write check judges it
            left = self.request_timeout
        elif self._began is not None:
            left = self._began + self.request_timeout - monotonic()
        else:
            left = self._time + self.keep_alive_timeout - monotonic()
        if left <= 0:
            return self.transport.close()
        self._callback_check_timeouts = self.loop.call_later(left + 0.01,
                                                             self._check_timeouts)
        return None

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._fast:  # the requests left waiting, or reading paused on a full buffer
            self._serve()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._fast:
            return super().connection_lost(exc)
        self.connections.discard(self)
        for handle in (self._callback_check_timeouts, self._write_check):
            if handle is not None:
                handle.cancel()
        self._callback_check_timeouts = self._write_check = None
        return None


def _connection_settings(app: Any) -> tuple:
    """What Sanic's `HttpProtocolMixin._setup` reads for each connection, and whether
    connections may be kept alive at all (`KEEP_ALIVE`, e.g. SANIC_KEEP_ALIVE=false)."""
    config = app.config
    return (config.ACCESS_LOG, app.handle_request, app.error_handler, config.REQUEST_TIMEOUT,
            config.RESPONSE_TIMEOUT, config.KEEP_ALIVE_TIMEOUT, config.REQUEST_MAX_SIZE,
            app.request_class or Request, config.KEEP_ALIVE)


def protocol_for(http: HttpConfig) -> type[GuardedProtocol]:
    """The public port's protocol: with the fast path (`[http] fast_path`), or Sanic's."""
    return FastProtocol if http.fast_path else GuardedProtocol
