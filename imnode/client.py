"""The reference client of the imnode protocol, used by the tests, the demo and the bench.

It does what a mobile client does: ask where to connect, connect, say hello, send
heartbeats, send messages and wait for their acks, receive messages, and on `goaway`
(the node drains) wait the time it was given, ask the dispatcher again (excluding the
node it is leaving) and reconnect. When its connection is lost (the node died), it asks
again at once, excluding that node; a 503 from the dispatcher makes it wait the
`Retry-After` it was given and ask again, without the exclusion this time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from imnode import protocol

Address = tuple[str, int]
Locate = Callable[[Sequence[str]], Awaitable[Address]]
"""Where should I connect, not to these node ids? (the dispatcher's get-tcp-ip)."""


class ClientError(Exception):
    """The server answered with `error {code, message}` (or the dispatcher with an HTTP
    error: code `http_<status>`, and `retry_after` seconds for a 503)."""

    def __init__(self, code: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.retry_after = retry_after


CONNECT_ERRORS = (ClientError, OSError, EOFError, TimeoutError, ValueError, KeyError,
                  protocol.ProtocolError)
"""What a failed attempt to locate a node and connect to it can raise: refused, the node
vanished mid-handshake (EOFError), or something answered nonsense."""


class ImClient:
    """One client. After a drain's `goaway` it stops sending, waits the delay it was given
    (acks still arrive meanwhile), then asks `locate` where to go and reconnects, retrying
    with backoff `reconnect_attempts` times before it gives up (`gave_up`). A lost
    connection makes it do the same at once (with `locate`), unless the node closed it
    with an error or a newer login of the same uid replaced it."""

    def __init__(
        self, uid: str, *, locate: Locate | None = None, heartbeat_interval: float | None = None,
        reconnect_attempts: int = 8,
    ) -> None:
        self.uid = protocol.require_uid(uid)
        self.locate = locate
        self.heartbeat_interval = heartbeat_interval  # default: what the node asks for
        self.node_id: str | None = None
        self.address: Address | None = None
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.goaways: list[dict[str, Any]] = []
        self.closed_by_server: ClientError | None = None
        self.reconnects = 0
        self._ids = itertools.count(1)
        self._acks: dict[Any, asyncio.Future] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._leaving: asyncio.Task | None = None
        self.reconnect_attempts = reconnect_attempts
        self.gave_up: BaseException | None = None
        self.connected = asyncio.Event()

    async def connect(self, address: Address | None = None, *, timeout: float = 10.0) -> str:
        """Connect (to `address`, or where `locate` says) and say hello; return the node id."""
        if address is None:
            if self.locate is None:
                raise ValueError("no address and no way to locate a node")
            address = await self.locate(())
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), timeout)
        writer.write(protocol.encode({"type": "hello", "uid": self.uid}))
        try:
            welcome = await asyncio.wait_for(_read_frame(reader), timeout)
        except BaseException:
            writer.close()
            raise
        if welcome["type"] == "error":
            writer.close()
            raise ClientError(welcome.get("code", "?"), welcome.get("message", ""))
        if welcome["type"] != "welcome":
            writer.close()
            raise ClientError("protocol", f"expected welcome, got {welcome['type']}")
        self._reader, self._writer, self.address = reader, writer, address
        self.node_id = welcome["node_id"]
        self.closed_by_server = None
        # Ping a little more often than the node asks, so a late timer never costs the link.
        interval = self.heartbeat_interval or 0.8 * welcome.get("heartbeat_ms", 30_000) / 1000
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_loop(reader)),
                       loop.create_task(self._heartbeat(writer, interval))]
        self.connected.set()
        return self.node_id

    async def send(self, to: str, body: Any, *, timeout: float = 5.0) -> None:
        """Send a message; return once the node acknowledged delivery (or raise)."""
        msg_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._acks[msg_id] = future
        try:
            self._write({"type": "msg", "to": to, "body": body, "id": msg_id})
            await asyncio.wait_for(future, timeout)
        finally:
            self._acks.pop(msg_id, None)

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message delivered to this client."""
        return await asyncio.wait_for(self.messages.get(), timeout)

    def ping(self) -> None:
        self._write({"type": "ping"})

    async def close(self) -> None:
        self._closing = True
        if self._leaving is not None and self._leaving is not asyncio.current_task():
            self._leaving.cancel()
        await self._disconnect()

    def _write(self, frame: dict[str, Any]) -> None:
        if self._writer is None or self._writer.is_closing() or self._leaving is not None:
            raise ConnectionError(f"{self.uid} is not connected (or is leaving its node)")
        self._writer.write(protocol.encode(frame))

    async def _disconnect(self) -> None:
        self.connected.clear()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        for future in self._acks.values():
            if not future.done():
                future.set_exception(ConnectionError("connection closed before the ack"))

    async def _heartbeat(self, writer: asyncio.StreamWriter, interval: float) -> None:
        ping = protocol.encode({"type": "ping"})
        while not writer.is_closing():
            await asyncio.sleep(interval)
            writer.write(ping)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await _read_frame(reader)
                kind = frame["type"]
                if kind == "msg":
                    self.messages.put_nowait(frame)
                elif kind in ("ack", "error") and frame.get("id") in self._acks:
                    future = self._acks[frame["id"]]
                    if not future.done():
                        if kind == "ack":
                            future.set_result(None)
                        else:
                            future.set_exception(ClientError(frame.get("code", "?"),
                                                             frame.get("message", "")))
                elif kind == "error" and "id" not in frame:  # about the connection
                    self.closed_by_server = ClientError(frame.get("code", "?"),
                                                        frame.get("message", ""))
                elif kind == "goaway" and self._leaving is None:
                    self.goaways.append(frame)
                    self._leaving = asyncio.get_running_loop().create_task(self._go_away(frame))
        except protocol.ProtocolError as exc:  # the server broke the protocol: hang up
            self.closed_by_server = ClientError(exc.code, exc.message)
            await self._disconnect()
        except (asyncio.IncompleteReadError, ConnectionError):
            if self._closing or self._leaving is not None:
                return
            await self._disconnect()
            if self.locate is not None and self.closed_by_server is None:  # the node died
                self._leaving = asyncio.get_running_loop().create_task(
                    self._relocate(self.node_id))

    async def _go_away(self, frame: dict[str, Any]) -> None:
        """Leave this node; after a drain, reconnect where the dispatcher says, later."""
        drain = frame.get("reason") == "drain" and self.locate is not None
        if drain:  # stay until the given time: acks of messages in flight still arrive
            await asyncio.sleep(frame.get("reconnect_after_ms", 0) / 1000)
        await self._disconnect()
        if not drain or self._closing:
            self._leaving = None
            return  # replaced by a newer login of the same uid: stay away
        await self._relocate(self.node_id)

    async def _relocate(self, leaving: str | None) -> None:
        """Ask where to go and reconnect, with jittered backoff; a dispatcher's 503 sets
        the least wait. Only the first request excludes `leaving`: by the next one it may
        be back, and the dispatcher knows whether it is. `close()` cancels this task."""
        delay = 0.25
        for attempt in range(self.reconnect_attempts):
            try:
                address = await self.locate([leaving] if leaving and not attempt else [])
                await self.connect(address)
                self._leaving = None  # no await since connect: the read loop sees this
                self.reconnects += 1
                self.gave_up = None
                return
            except CONNECT_ERRORS as exc:
                if attempt == self.reconnect_attempts - 1:
                    self.gave_up = exc
                    break
                wait = delay * (0.5 + random.random())  # jitter: no herd
                await asyncio.sleep(max(wait, getattr(exc, "retry_after", 0.0)))
                delay = min(delay * 2, 10.0)
        self._leaving = None


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    length = int.from_bytes(await reader.readexactly(protocol.LENGTH_BYTES), "big")
    if length > protocol.MAX_FRAME:
        raise ConnectionError(f"server sent a frame of {length} bytes")
    return protocol.decode(await reader.readexactly(length))


def dispatcher_locator(url: str, uid: str, *, timeout: float = 5.0) -> Locate:
    """A `locate` that asks the dispatcher's `GET /get-tcp-ip` (plain HTTP/1.1)."""
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80

    async def locate(exclude: Sequence[str]) -> Address:
        query = urllib.parse.urlencode({"uid": uid, **({"exclude": ",".join(exclude)}
                                                        if exclude else {})})
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        try:
            writer.write(f"GET {parsed.path.rstrip('/')}/get-tcp-ip?{query} HTTP/1.1\r\n"
                         f"Host: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            response = await asyncio.wait_for(reader.read(), timeout)
        finally:
            writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
            answer = orjson.loads(body)
            if status != 200:
                raise ClientError(f"http_{status}", str(answer.get("error", answer)),
                                  float(answer.get("retry_after", 0) or 0))
            return answer["ip"], answer["port"]
        except (IndexError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ClientError("bad_answer", f"the dispatcher answered {response[:80]!r}: "
                                            f"{exc!r}") from None

    return locate
