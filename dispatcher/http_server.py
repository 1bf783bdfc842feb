"""The dispatcher's HTTP/1.1 server around Sanic: limits no client can get past, and the
listening sockets.

- A request, head and body, must arrive within `REQUEST_TIMEOUT` of its first byte (Sanic
  times a head from its last byte, so a byte every few seconds held a connection for
  good, and a body only at the response timeout, 60 s).
- A URL the parser refuses (a control byte) is a 400, not three chained tracebacks.
- An answer must be taken: a connection whose writes stay stalled (the client reads
  nothing) for `REQUEST_TIMEOUT` is closed, not kept for the 60 s response timeout.
- A worker holds at most `connection_cap()` connections, below its file limit: past it,
  the longest-quiet connections that are idle, still arriving or stalled writing are
  closed, so new clients are served (the kernel would refuse them with EMFILE otherwise).
- A protocol-level 400 says what was wrong without repeating the request.
- `AdminListener` serves the `[http] admin_listen` socket in each worker; its
  connections are marked as the admin side's.
"""

from __future__ import annotations

import asyncio
import functools
import resource
import socket
from time import monotonic
from typing import Any

from sanic import Sanic
from sanic.exceptions import BadRequest, RequestTimeout
from sanic.http import Http, Stage
from sanic.request import Request
from sanic.server.protocols.http_protocol import HttpProtocol
from sanic.server.socket import bind_socket

from imnode.contract import host_port

RESERVED_FILES = 64  # kept for the event log, NATS, the ledger, the admin socket, ...
EVICT_SHARE = 16  # past the cap, this share of the connections is closed at once
HARD_CLOSE_AFTER = 1.0  # seconds a timed-out connection has to take its 408
_HEAD_FAULTS = {  # the cause of Sanic's "Bad Request" -> what the client is told
    "Duplicate Content-Length or Transfer-Encoding":
        "two Content-Length or Transfer-Encoding headers",
}


class ListenError(Exception):
    """A socket the server cannot listen on; the message is one line for the operator."""


def listen(host: str, port: int, backlog: int, setting: str) -> socket.socket:
    """A listening socket, made before any worker starts: a taken port is one line."""
    try:
        return bind_socket(host, port, backlog=backlog)
    except OSError as exc:
        where = host_port(host, port)
        raise ListenError(f"cannot listen on {where} ({setting}): "
                          f"{exc.strerror or exc}") from None


def raise_file_limit() -> int:
    """Lift this process's soft limit on open files to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an infinite hard limit some systems refuse
            pass
    return soft


def connection_cap(file_limit: int | None = None) -> int:
    """Connections one worker holds at most: its file limit less what it needs besides."""
    if file_limit is None:
        file_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if file_limit == resource.RLIM_INFINITY:
        file_limit = 1 << 20
    return max(16, file_limit - max(RESERVED_FILES, file_limit // 16))


class GuardedHttp(Http):
    """Sanic's HTTP/1.1 state machine, knowing when the current request began: a
    connection's first request at its accept (a connection that sends nothing is a
    request that never arrives), a later one at its first byte."""

    __slots__ = ("began", "requests")

    def __init__(self, protocol: GuardedProtocol) -> None:
        super().__init__(protocol)
        self.began: float | None = protocol.request_began()
        self.requests = 0
        self.request_body = self.response = None  # read by the timeout check meanwhile

    def init_for_request(self) -> None:
        super().init_for_request()
        self.requests += 1
        if self.requests > 1:  # bytes already buffered (pipelined) start it now
            self.began = monotonic() if self.recv_buffer else None

    def receiving(self) -> bool:
        """Whether a request's head or body is still arriving (or the first is awaited)."""
        return (self.stage is Stage.REQUEST or bool(self.request_body)
                or (self.stage is Stage.IDLE and self.requests <= 1 and self.response is None))

    def refuse_body(self) -> None:
        """Answer without waiting for the body (it may never come), then close; a body
        already here is passed over as usual and the connection kept. No "100 Continue":
        the client is not to send a body."""
        self.expecting_continue = False
        if self.request_body is True and len(self.recv_buffer) >= self.request_bytes_left:
            return
        self.request_body = None
        self.keep_alive = False

    async def http1(self) -> None:
        """Sanic's loop; a connection closed under a head still arriving (evicted) ends
        quietly: Sanic's "stopped" line names the request, and there is none yet (it was
        an AttributeError traceback for each)."""
        try:
            await super().http1()
        except AttributeError:
            if self.request is not None or self.protocol.transport is not None:
                raise

    async def error_response(self, exception: Exception) -> None:
        """A 400 that says what was wrong, never repeating the request: Sanic's error for
        a URL httptools refuses repeats the URL (15 kB of control bytes came back), and
        any other fault of the head just says "Bad Request" (`BadURL is BadRequest`)."""
        if type(exception) is BadRequest:
            message = str(exception)
            if message.startswith("Bad URL"):
                exception = BadRequest("the URL is not valid (control characters or "
                                       "spaces in it?)")
            elif message == "Bad Request":  # Sanic's, for any fault it found in the head
                exception = BadRequest(_HEAD_FAULTS.get(
                    str(exception.__context__), "the request line or a header is malformed"))
            elif message == "Bad content-length":
                exception = BadRequest("the Content-Length is not a number of bytes")
        await super().error_response(exception)

    def create_empty_request(self) -> None:
        """The stand-in request Sanic makes to answer an error: with a URL it can parse."""
        try:
            super().create_empty_request()
        except BadRequest:
            self.url = None
            super().create_empty_request()


class GuardedProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol with a deadline for whole requests and a connection cap.
    The cap is set per worker (`GuardedProtocol.cap`) once its file limit is known."""

    HTTP_CLASS = GuardedHttp
    __slots__ = ("_unsent", "_write_check", "stalled_since")
    cap = connection_cap()
    admin_side = False

    def connection_made(self, transport: Any) -> None:
        self.admit()
        super().connection_made(transport)
        self._time = monotonic()  # not 0: the newest must not look the quietest
        self.conn_info.ctx.admin_side = self.admin_side

    def admit(self) -> None:
        """A new connection: room made for it past the cap, its guards set."""
        if len(self.connections) >= self.cap:
            _evict(self.connections, max(1, self.cap // EVICT_SHARE))
        self._http = None  # until the connection's task starts (Sanic leaves it unset)
        self.stalled_since: float | None = None  # writes paused since, if they are
        self._unsent = 0  # bytes waiting to be written when last looked at
        self._write_check: asyncio.TimerHandle | None = None

    def request_began(self) -> float:
        """When the request Sanic is about to read began: its first byte, or for a
        connection's first request, its accept (now, as Sanic takes it at once)."""
        return monotonic()

    def data_received(self, data: bytes) -> None:
        http = self._http
        if http is not None and http.began is None:
            http.began = monotonic()
        HttpProtocol.data_received(self, data)

    def pause_writing(self) -> None:
        """The transport's buffer is full: the client reads slowly, or not at all."""
        super().pause_writing()
        if self.stalled_since is None and self.transport is not None:
            self.stalled_since = monotonic()
            self._unsent = self.transport.get_write_buffer_size()
            self._write_check = self.loop.call_later(self.request_timeout, self._check_write)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.stalled_since = None
        if self._write_check is not None:
            self._write_check.cancel()
            self._write_check = None

    def _check_write(self) -> None:
        """Still paused: closed if not a byte was taken since the last look (a client
        that never reads held the connection for the 60 s response timeout)."""
        self._write_check = None
        if self.transport is None or self.stalled_since is None:
            return
        unsent = self.transport.get_write_buffer_size()
        if unsent >= self._unsent:
            self.abort()
            return
        self._unsent, self.stalled_since = unsent, monotonic()  # slow, but reading
        self._write_check = self.loop.call_later(self.request_timeout, self._check_write)

    def quiet_since(self) -> float | None:
        """Since when this connection has done nothing another client could not have the
        file of instead: idle, a request still arriving, or its writes stalled (the
        client does not read its answers); None while it is being answered."""
        if self.transport is None:
            return None
        if self.stalled_since is not None:
            return self.stalled_since
        http = self._http
        if http is None or http.stage is Stage.IDLE or http.receiving():
            return self._time
        return None

    def check_timeouts(self) -> None:
        """Sanic's rules, except that a request being received is timed from its first
        byte, not from its last one; checked again right when its deadline falls."""
        http = self._http
        if not self._task or http is None:
            return
        if not http.receiving() or http.began is None:
            return super().check_timeouts()
        left = http.began + self.request_timeout - monotonic()
        if left > 0:
            self._callback_check_timeouts = self.loop.call_later(left + 0.01,
                                                                 self.check_timeouts)
            return
        http.exception = RequestTimeout("the request did not arrive in time")
        http.refuse_body()
        self._task.cancel()
        self._callback_check_timeouts = self.loop.call_later(HARD_CLOSE_AFTER, self.abort)


async def receive_body(request: Request) -> None:
    """Read the body of a streaming route's request (Sanic lifts the size limit for
    those): within `REQUEST_MAX_SIZE`, else 413."""
    request.stream.request_max_size = request.app.config.REQUEST_MAX_SIZE
    await request.receive_body()


class AdminSide(GuardedProtocol):
    """Connections of the `[http] admin_listen` socket."""

    admin_side = True


class AdminListener:
    """The `admin_listen` socket (bound by `serve`, passed to every worker), served by this
    worker's app beside the public one. Not as a second Sanic server: Sanic ran the app's
    stop listeners again for it, on a loop that had stopped, and spun at exit."""

    GRACE = 5.0  # seconds admin requests in flight have to finish at a stop

    def __init__(self, sock: socket.socket, backlog: int) -> None:
        self.sock, self.backlog = sock, backlog
        self.server: asyncio.Server | None = None
        self.connections: set[AdminSide] = set()

    async def start(self, app: Sanic) -> None:
        protocol = functools.partial(AdminSide, loop=app.loop, app=app,
                                     connections=self.connections)
        self.server = await app.loop.create_server(protocol, sock=self.sock,
                                                   backlog=self.backlog)

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.close()
        deadline = monotonic() + self.GRACE
        while self.connections and monotonic() < deadline:
            for connection in list(self.connections):
                connection.close_if_idle()
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()


def _evict(connections: set[GuardedProtocol], count: int) -> None:
    """Close the `count` longest-quiet connections (see `GuardedProtocol.quiet_since`)."""
    quiet = [(since, c) for c in connections if (since := c.quiet_since()) is not None]
    quiet.sort(key=lambda item: item[0])
    for _, connection in quiet[:count]:
        connection.abort()
