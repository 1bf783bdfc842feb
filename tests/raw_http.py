"""Raw HTTP/1.x on a loopback socket, for tests that must see exactly what a server sends
and when it closes: a byte stream sent in pieces, everything answered until the server
closes or falls quiet, and that split into responses (pipelined ones too)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Callable, Sequence
from time import monotonic
from typing import Any, NamedTuple


class Exchange(NamedTuple):
    """What one connection got back."""

    data: bytes  # every byte the server sent
    closed: bool  # whether the server closed the connection (a FIN, or a reset)


class Response(NamedTuple):
    status_line: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # (lower-case name, value), as sent
    body: bytes


class Connection:
    """A client connection to 127.0.0.1:`port`: what it sent, what it received, and
    whether the server closed it. `source`: the loopback address to connect from
    (127.0.0.1 is the kernel's choice); `limit`: seconds it may last in all."""

    def __init__(self, port: int, limit: float = 10.0, source: str | None = None) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=limit,
            source_address=(source, 0) if source else None)
        self.deadline = monotonic() + limit
        self.received = bytearray()
        self.closed = False

    def send(self, chunks: Sequence[bytes], pause: float = 0.0,
             half_close: bool = False) -> None:
        """Send `chunks`, `pause` seconds apart, reading all the while (a server that
        closes while bytes of ours are on their way resets the connection, and an
        answer not yet read might be lost with it). `half_close`: then say that nothing
        more comes (a FIN, as `nc -N` sends: the answers are still wanted)."""
        for index, chunk in enumerate(chunks):
            try:
                self.sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return  # closed: what came before the reset is still to be read
            if index < len(chunks) - 1 and pause:
                self.read(pause, until_quiet=False)
                if self.closed:
                    return
        if half_close:
            with contextlib.suppress(OSError):  # the server has reset the connection
                self.sock.shutdown(socket.SHUT_WR)

    def read(self, seconds: float, until_quiet: bool = True) -> Exchange:
        """Read for `seconds` (`until_quiet`: until that long passes without a byte),
        until the server closes, or until the deadline; everything received so far."""
        if not self.closed:
            self.closed = _read(self.sock, self.received, seconds, self.deadline,
                                until_quiet)
        return Exchange(bytes(self.received), self.closed)

    def close(self) -> None:
        self.sock.close()


def exchange(port: int, chunks: Sequence[bytes], pause: float = 0.0, quiet: float = 0.3,
             limit: float = 10.0, source: str | None = None,
             half_close: bool = False) -> Exchange:
    """Send `chunks` on a new `Connection` (see its `send`), then read until the server
    closes or sends nothing for `quiet` seconds, `limit` seconds at most."""
    connection = Connection(port, limit, source)
    try:
        connection.send(chunks, pause, half_close)
        return connection.read(quiet)
    finally:
        connection.close()


def _read(sock: socket.socket, into: bytearray, seconds: float, deadline: float,
          until_quiet: bool = True) -> bool:
    """Read into `into` for `seconds` (`until_quiet`: until that long passes without a
    byte) and no later than `deadline`; True once the server has closed."""
    ends = min(monotonic() + seconds, deadline)
    while (left := ends - monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return True
        if not chunk:
            return True
        into += chunk
        if until_quiet:
            ends = min(monotonic() + seconds, deadline)
    return False


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Run `calls` in threads at the same time (one exchange with each server, so they
    see the same pauses); their results in order."""
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as exc:  # raised below, in the caller
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def responses(data: bytes) -> tuple[list[Response], bytes]:
    """The whole responses at the front of `data`, in order, and the bytes after them.

    A body is as long as its Content-Length says, except where the next response begins
    in its place or the bytes end right after the head: an answer to HEAD, which has the
    length of the body it does not send. A response without Content-Length has no body
    (this server chunks nothing it answers on the routes the tests ask)."""
    found, at = [], 0
    while True:
        end = data.find(b"\r\n\r\n", at)
        if end < 0:
            return found, data[at:]
        status_line, *lines = data[at:end].split(b"\r\n")
        headers = []
        for line in lines:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        length = next((int(value) for name, value in headers if name == b"content-length"),
                      0)
        start = end + 4
        if data.startswith(b"HTTP/1.", start) or start == len(data):
            length = 0
        if len(data) < start + length:
            return found, data[at:]
        found.append(Response(status_line, tuple(headers), data[start:start + length]))
        at = start + length


def status(response: Response) -> int:
    return int(response.status_line.split()[1])


def header(response: Response, name: bytes) -> bytes | None:
    """The value of the last `name` header (lower case) of `response`, or None."""
    values = [value for key, value in response.headers if key == name]
    return values[-1] if values else None
