"""The IM node: client long connections, heartbeats, capacity, delivery and drain.

One `asyncio.Protocol` per connection and no task per connection, so an idle client costs
a few kilobytes. One sweeper task closes clients that never said hello or stopped sending
heartbeats. Messages to a uid on this node are written directly; to a uid elsewhere they
go over NATS, where every node subscribes `im.user.<uid>.*` for each uid it holds: a
request to `im.user.<uid>.msg` reaches the node that holds the uid, and "no responders"
means nobody does (offline). A login publishes `im.user.<uid>.login` so that an older
session of the same uid on another node is told to go away.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import orjson

from imnode import protocol
from imnode.load import LoadMonitor
from imnode.protocol import ProtocolError

try:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeoutError
except ImportError:  # pragma: no cover - nats-py is a dependency
    NoRespondersError = NatsTimeoutError = Exception  # type: ignore[misc,assignment]

PONG = protocol.encode({"type": "pong"})
USER_SUBJECT = "im.user.{uid}.{action}"


@dataclass(slots=True)
class NodeConfig:
    node_id: str
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (tests)
    advertise: tuple[str, int] | None = None  # what status reports; default: where it listens
    capacity: int = 10_000
    heartbeat_interval: float = 30.0  # clients should ping at least this often
    missed_heartbeats: int = 3  # silent for this many intervals: closed
    hello_timeout: float = 10.0
    drain_window: float = 10.0  # goaway's reconnect_after_ms is spread over this window
    drain_timeout: float = 60.0  # then the remaining clients are closed
    delivery_timeout: float = 2.0  # for a message to reach a uid on another node
    max_write_buffer: int = 1 << 20  # a client that reads slower than this is dropped
    version: str = "0.1.0"


class Connection(asyncio.Protocol):
    """One client's TCP connection."""

    __slots__ = ("logged_in_at", "node", "opened", "reader", "seen", "transport", "uid")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.reader = protocol.FrameReader()
        self.transport: asyncio.Transport | None = None
        self.uid: str | None = None
        self.opened = self.seen = time.monotonic()
        self.logged_in_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.node.admit(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except ProtocolError as exc:
            self.fail(exc)
            return
        if frames:
            self.seen = time.monotonic()  # only whole frames count as a sign of life
        for frame in frames:
            if self.transport.is_closing():
                return
            try:
                self.node.handle(self, frame)
            except ProtocolError as exc:
                self.fail(exc)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.node.forget(self)

    def send(self, frame: dict[str, Any]) -> None:
        self.write(protocol.encode(frame))

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.node.config.max_write_buffer:
            self.node.stats["slow_consumers"] += 1
            transport.abort()  # it cannot keep up; nothing more can reach it anyway

    def fail(self, exc: ProtocolError) -> None:
        """Tell the client what was wrong, then close (after the error is written)."""
        self.node.stats["protocol_errors"] += 1
        self.send({"type": "error", "code": exc.code, "message": exc.message})
        if self.transport is not None:
            self.transport.close()

    def goaway(self, reconnect_after_ms: int, reason: str) -> None:
        self.send({"type": "goaway", "reconnect_after_ms": reconnect_after_ms, "reason": reason})


class Node:
    """An IM node; `nc` (a connected nats-py client, or None) carries cross-node traffic."""

    def __init__(self, config: NodeConfig, nc: Any = None) -> None:
        self.config = config
        self.nc = nc
        self.connections: set[Connection] = set()
        self.sessions: dict[str, Connection] = {}  # uid -> its connection on this node
        self.draining = False
        self.started = time.monotonic()
        self.load = LoadMonitor()
        self.stats = dict.fromkeys(
            ("messages_in", "messages_delivered", "messages_offline", "heartbeats",
             "heartbeats_timed_out", "hello_timeouts", "refused_busy", "protocol_errors",
             "slow_consumers", "replaced"), 0)
        self._server: asyncio.Server | None = None
        self._subscriptions: dict[str, Any] = {}  # uid -> its NATS subscription
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._empty = asyncio.Event()
        self._drained: asyncio.Future | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self), self.config.host, self.config.port, backlog=4096
        )
        if self.config.port == 0:
            self.config.port = self._server.sockets[0].getsockname()[1]
        self.load.start()
        self._sweeper = loop.create_task(self._sweep())
        self._drained = loop.create_future()

    async def attach(self, nc: Any) -> None:
        """Start carrying cross-node traffic over `nc` (connected after the node started)."""
        self.nc = nc
        for uid in list(self.sessions):
            await self._subscribe(uid)

    async def drained(self) -> None:
        """Return once a drain has finished (or the node was stopped)."""
        await asyncio.shield(self._drained)

    @property
    def address(self) -> tuple[str, int]:
        """The address clients are sent to (advertised), as status reports it."""
        return self.config.advertise or (self.config.host, self.config.port)

    async def drain(self) -> None:
        """Stop accepting, tell every client to go away (spread over the drain window),
        wait until they have left or the drain timeout passed, then close the rest."""
        if self.draining:
            await asyncio.shield(self._drained)
            return
        self.draining = True
        if self._server is not None:
            self._server.close()
        window = int(self.config.drain_window * 1000)
        for connection in list(self.connections):
            connection.goaway(random.randint(0, window), "drain")
        self._empty.clear()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), self.config.drain_timeout)
        for connection in list(self.connections):
            connection.transport.close()
        if not self._drained.done():
            self._drained.set_result(None)

    async def stop(self) -> None:
        """Close everything now (after `drain`, or in tests)."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.transport.abort()
        for task in (self._sweeper, *self._tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._sweeper, *self._tasks) if t),
                             return_exceptions=True)
        await self.load.stop()
        for subscription in self._subscriptions.values():
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        self._subscriptions.clear()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- connections ------------------------------------------------------------------

    def admit(self, connection: Connection) -> None:
        if self.draining or len(self.connections) >= self.config.capacity:
            self.stats["refused_busy"] += 1
            connection.send({"type": "error", "code": "busy",
                             "message": f"node {self.config.node_id} is full or draining"})
            connection.transport.close()
            return
        self.connections.add(connection)

    def forget(self, connection: Connection) -> None:
        self.connections.discard(connection)
        uid = connection.uid
        if uid is not None and self.sessions.get(uid) is connection:
            del self.sessions[uid]
            subscription = self._subscriptions.pop(uid, None)
            if subscription is not None:
                self._spawn(subscription.unsubscribe())
        if not self.connections:
            self._empty.set()

    async def _sweep(self) -> None:
        """Once a second: close clients silent past their heartbeat or hello deadline."""
        config = self.config
        silence = config.heartbeat_interval * config.missed_heartbeats
        while True:
            await asyncio.sleep(min(1.0, config.heartbeat_interval / 2))
            now = time.monotonic()
            for connection in list(self.connections):
                if connection.uid is None and now - connection.opened > config.hello_timeout:
                    self.stats["hello_timeouts"] += 1
                    connection.fail(ProtocolError(
                        "hello_timeout", f"no hello within {config.hello_timeout:g} s"))
                elif now - connection.seen > silence:
                    self.stats["heartbeats_timed_out"] += 1
                    connection.fail(ProtocolError(
                        "heartbeat_timeout", f"no frame for {silence:g} s"))

    # -- frames -----------------------------------------------------------------------

    def handle(self, connection: Connection, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if connection.uid is None:
            if kind != "hello":
                raise ProtocolError("hello_first", "the first frame must be hello")
            self._hello(connection, frame)
        elif kind == "ping":
            self.stats["heartbeats"] += 1
            connection.write(PONG)
        elif kind == "msg":
            self._message(connection, frame)
        elif kind == "hello":
            raise ProtocolError("hello_twice", "hello was already said on this connection")
        else:
            raise ProtocolError("unknown_type", f"unknown frame type {kind[:40]!r}")

    def _hello(self, connection: Connection, frame: dict[str, Any]) -> None:
        uid = protocol.require_uid(frame.get("uid"))
        previous = self.sessions.get(uid)
        connection.uid, connection.logged_in_at = uid, time.time()
        self.sessions[uid] = connection
        if previous is not None:  # the newer connection wins
            self._replace(previous)
        elif self.nc is not None:
            self._spawn(self._subscribe(uid))
        if self.nc is not None:
            notice = {"node": self.config.node_id, "at": connection.logged_in_at}
            self._spawn(self.nc.publish(USER_SUBJECT.format(uid=uid, action="login"),
                                        orjson.dumps(notice)))
        connection.send({
            "type": "welcome",
            "node_id": self.config.node_id,
            "heartbeat_ms": int(self.config.heartbeat_interval * 1000),
        })

    def _replace(self, connection: Connection) -> None:
        self.stats["replaced"] += 1
        connection.goaway(0, "replaced")
        connection.transport.close()

    def _message(self, connection: Connection, frame: dict[str, Any]) -> None:
        to = protocol.require_uid(frame.get("to"))
        msg_id = protocol.require_msg_id(frame)
        self.stats["messages_in"] += 1
        out = protocol.encode({"type": "msg", "from": connection.uid,
                               "body": frame.get("body"), "id": msg_id})
        local = self.sessions.get(to)
        if local is not None:
            local.write(out)
            self.stats["messages_delivered"] += 1
            connection.send({"type": "ack", "id": msg_id})
        elif self.nc is not None and self.nc.is_connected:
            payload = out[protocol.LENGTH_BYTES:]  # the node holding `to` frames it again
            self._spawn(self._deliver_elsewhere(connection, to, msg_id, payload))
        else:
            self._offline(connection, to, msg_id)

    def _offline(self, connection: Connection, to: str, msg_id: Any,
                 code: str = "offline") -> None:
        self.stats["messages_offline"] += 1
        connection.send({"type": "error", "code": code, "id": msg_id,
                         "message": f"{to} is not connected" if code == "offline"
                         else f"could not reach {to} in time"})

    # -- across nodes -----------------------------------------------------------------

    async def _deliver_elsewhere(self, sender: Connection, to: str, msg_id: Any,
                                 payload: bytes) -> None:
        try:
            reply = await self.nc.request(USER_SUBJECT.format(uid=to, action="msg"),
                                          payload, timeout=self.config.delivery_timeout)
        except NoRespondersError:
            self._offline(sender, to, msg_id)
            return
        except NatsTimeoutError:
            self._offline(sender, to, msg_id, code="timeout")
            return
        if reply.data != b"ok":
            self._offline(sender, to, msg_id)
            return
        self.stats["messages_delivered"] += 1
        sender.send({"type": "ack", "id": msg_id})

    async def _subscribe(self, uid: str) -> None:
        subscription = await self.nc.subscribe(USER_SUBJECT.format(uid=uid, action="*"),
                                               cb=self._on_user_subject)
        if self.sessions.get(uid) is None or uid in self._subscriptions:
            await subscription.unsubscribe()  # gone (or subscribed again) meanwhile
        else:
            self._subscriptions[uid] = subscription

    async def _on_user_subject(self, msg: Any) -> None:
        _, _, uid, action = msg.subject.split(".")
        local = self.sessions.get(uid)
        if action == "msg":
            if local is None or len(msg.data) > protocol.MAX_FRAME:
                await msg.respond(b"offline")
                return
            local.write(len(msg.data).to_bytes(protocol.LENGTH_BYTES, "big") + msg.data)
            await msg.respond(b"ok")
        elif action == "login" and local is not None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                notice = orjson.loads(msg.data)
                if notice["node"] != self.config.node_id and notice["at"] > local.logged_in_at:
                    self._replace(local)

    def _spawn(self, coroutine: Coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The status reply: what the dispatcher pulls (contract fields first)."""
        ip, port = self.address
        return {
            "node_id": self.config.node_id,
            "ip": ip,
            "port": port,
            "connections": len(self.connections),
            "capacity": self.config.capacity,
            "accepting": not self.draining and len(self.connections) < self.config.capacity,
            "draining": self.draining,
            "cpu": round(self.load.cpu, 4),
            "loop_lag_ms": round(self.load.loop_lag_ms, 3),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "version": self.config.version,
            "ts": time.time(),
            "sessions": len(self.sessions),
            **self.stats,
        }
