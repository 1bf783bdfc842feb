"""The IM node: client long connections, heartbeats, capacity, delivery and drain.

One `asyncio.Protocol` per connection and no task per connection, so an idle client costs
a few kilobytes. One sweeper task closes clients that never said hello or stopped sending
heartbeats. Messages to a uid on this node are written directly; to a uid elsewhere they
go over NATS, where every node subscribes `im.user.<uid>.*` for each uid it holds: a
request to `im.user.<uid>.msg` reaches the node that holds the uid, and "no responders"
means nobody does (offline). A login publishes a notice on `im.login` so that an older
session of the same uid on another node is told to go away (the rule: imnode/logins.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from imnode import logins, protocol
from imnode.load import LoadMonitor
from imnode.logins import BadNotice, LoginClock, Stamp, Verdict
from imnode.protocol import ProtocolError
from imnode.tasks import cancel_and_wait

try:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeoutError
except ImportError:  # pragma: no cover - nats-py is a dependency
    NoRespondersError = NatsTimeoutError = Exception  # type: ignore[misc,assignment]

PONG = protocol.encode({"type": "pong"})
USER_SUBJECT = "im.user.{uid}.msg"
LOGIN_SUBJECT = "im.login"
HELLO_MAX_FRAME = 4096  # before hello, nothing bigger is needed: a stranger gets no more
CONNECTION_INFLIGHT = 64  # cross-node messages one client may have in flight...
CONNECTION_RESUME = 32  # ...before the node stops reading from it, until this many remain

log = logging.getLogger("imnode")


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
    recipient_buffer: int = 256 * 1024  # a recipient with more unread: messages refused
    max_write_buffer: int = 1 << 20  # a client with more unread than this is dropped
    max_inflight: int = 10_000  # cross-node messages in flight, all clients together
    close_grace: float = 2.0  # a closing client gets this long to take its last frames
    version: str = "0.1.0"


class Connection(asyncio.Protocol):
    """One client's TCP connection."""

    __slots__ = ("backlog", "closed", "inflight", "login", "node", "opened", "paused",
                 "reader", "seen", "transport", "uid")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.reader = protocol.FrameReader(HELLO_MAX_FRAME)
        self.transport: asyncio.Transport | None = None
        self.uid: str | None = None
        self.opened = self.seen = time.monotonic()
        self.login: Stamp | None = None  # set by hello: this session's place in the order
        self.inflight = 0  # its messages on their way to other nodes
        self.paused = False
        self.closed = False
        self.backlog: list[dict[str, Any]] | None = None  # read, not handled: while paused

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
            if self.backlog is not None:  # paused: these wait behind the others
                self.backlog += frames
            else:
                self._handle(frames)

    def _handle(self, frames: list[dict[str, Any]]) -> None:
        """Handle frames in order until done or closed. If the connection gets paused
        (too much in flight), the rest waits in `backlog` and reading stops, so TCP slows
        the sender down; no list is kept otherwise (an idle connection stays small)."""
        for index, frame in enumerate(frames):
            if self.closed:
                return
            try:
                self.node.handle(self, frame)
            except ProtocolError as exc:
                self.fail(exc)
            except Exception as exc:  # a frame the node cannot handle must not escape
                log.warning("closing %s: unexpected %r", self.uid or "a client", exc)
                self.fail(ProtocolError("bad_frame", "the node could not handle this frame"))
            if self.paused and not self.closed:
                self.backlog = frames[index + 1:]
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.node.forget(self)

    def send(self, frame: dict[str, Any]) -> None:
        self.write(protocol.encode(frame))

    def write(self, data: bytes) -> None:
        transport = self.transport
        if self.closed or transport is None:
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.node.config.max_write_buffer:
            self.node.stats["slow_consumers"] += 1
            self.close(grace=0)  # it cannot keep up; nothing more can reach it anyway

    def deliver(self, data: bytes) -> bool:
        """Write a message unless this client already has too much unread (then False)."""
        if self.closed or self.transport.get_write_buffer_size() > (
            self.node.config.recipient_buffer
        ):
            return False
        self.write(data)
        return True

    def fail(self, exc: ProtocolError) -> None:
        """Tell the client what was wrong, then close."""
        self.node.stats["protocol_errors"] += 1
        self.send({"type": "error", "code": exc.code, "message": exc.message})
        self.close()

    def close(self, grace: float | None = None) -> None:
        """Close now as far as the node is concerned (no session, no capacity slot); give
        the client `grace` seconds to take what is still buffered, then cut it off."""
        if self.closed:
            return
        self.closed = True
        self.node.forget(self)
        transport = self.transport
        if grace == 0:
            transport.abort()
            return
        transport.close()
        asyncio.get_running_loop().call_later(
            self.node.config.close_grace if grace is None else grace, transport.abort
        )

    def goaway(self, reconnect_after_ms: int, reason: str) -> None:
        self.send({"type": "goaway", "reconnect_after_ms": reconnect_after_ms, "reason": reason})

    def flight_started(self) -> None:
        self.inflight += 1
        if self.inflight >= CONNECTION_INFLIGHT and not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()  # backpressure: TCP slows the sender down

    def flight_ended(self) -> None:
        self.inflight -= 1
        if self.paused and self.inflight <= CONNECTION_RESUME and not self.closed:
            self.paused = False
            backlog, self.backlog = self.backlog or [], None
            self._handle(backlog)
            if not self.paused and not self.closed:
                self.transport.resume_reading()


class Node:
    """An IM node; `nc` (a connected nats-py client, or None) carries cross-node traffic."""

    def __init__(self, config: NodeConfig, nc: Any = None) -> None:
        self.config = config
        self.nc = nc
        self.connections: set[Connection] = set()
        self.sessions: dict[str, Connection] = {}  # uid -> its connection on this node
        self.clock = LoginClock()
        self.draining = False
        self.started = time.monotonic()
        self.load = LoadMonitor()
        self.stats = dict.fromkeys(
            ("messages_in", "messages_delivered", "messages_offline", "messages_refused",
             "heartbeats", "heartbeats_timed_out", "hello_timeouts", "refused_busy",
             "protocol_errors", "slow_consumers", "replaced"), 0)
        self.inflight = 0  # cross-node messages in flight, all connections
        self._server: asyncio.Server | None = None
        self._subscriptions: dict[str, Any] = {}  # uid -> its NATS subscription
        self._login_subscription: Any = None
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
        """Start carrying cross-node traffic over `nc` (connected after the node started):
        listen for logins elsewhere, subscribe the uids held here and announce them."""
        self.nc = nc
        self._login_subscription = await nc.subscribe(LOGIN_SUBJECT, cb=self._on_login)
        await self.resync()

    async def resync(self) -> None:
        """After attaching or a NATS reconnect: subscribe every uid held here that lacks a
        subscription, and announce every session again, so that a login elsewhere that
        happened meanwhile is settled (newest wins) and nothing waits on a lost notice."""
        if self.nc is None or not self.nc.is_connected:
            return
        for uid, connection in list(self.sessions.items()):
            if uid not in self._subscriptions:
                await self._subscribe(uid)
            self._announce(connection)

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
        for connection in list(self.sessions.values()):
            connection.goaway(random.randint(0, window), "drain")
        self._empty.clear()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), self.config.drain_timeout)
        for connection in list(self.connections):
            connection.close(grace=0)
        if not self._drained.done():
            self._drained.set_result(None)

    async def stop(self) -> None:
        """Close everything now (after `drain`, or in tests)."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close(grace=0)
        await cancel_and_wait(self._sweeper, *self._tasks)
        await self.load.stop()
        for subscription in (*self._subscriptions.values(), self._login_subscription):
            if subscription is not None:
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
            connection.close()
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
        """Several times a second: close clients silent past their hello or heartbeat
        deadline (each is closed once: closing takes it out of `connections`)."""
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
        if self.draining:
            raise ProtocolError("busy", f"node {self.config.node_id} is draining")
        previous = self.sessions.get(uid)
        connection.uid, connection.login = uid, self.clock.stamp(self.config.node_id)
        connection.reader.max_frame = protocol.MAX_FRAME
        self.sessions[uid] = connection
        if previous is not None:  # the newer connection wins
            self._replace(previous)
        elif self._connected():
            self._spawn(self._subscribe(uid))
        self._announce(connection)
        connection.send({
            "type": "welcome",
            "node_id": self.config.node_id,
            "heartbeat_ms": int(self.config.heartbeat_interval * 1000),
        })

    def _replace(self, connection: Connection) -> None:
        self.stats["replaced"] += 1
        connection.goaway(0, "replaced")
        connection.close()

    def _message(self, connection: Connection, frame: dict[str, Any]) -> None:
        to = protocol.require_uid(frame.get("to"))
        msg_id = protocol.require_msg_id(frame)
        self.stats["messages_in"] += 1
        try:
            out = protocol.encode({"type": "msg", "from": connection.uid,
                                   "body": frame.get("body"), "id": msg_id})
        except ProtocolError as exc:  # e.g. grown past 64 KiB by `from`: refuse this one only
            self._refuse(connection, msg_id, exc.code, exc.message)
            return
        local = self.sessions.get(to)
        if local is not None:
            if local.deliver(out):
                self.stats["messages_delivered"] += 1
                connection.send({"type": "ack", "id": msg_id})
            else:
                self._refuse(connection, msg_id, "recipient_busy",
                             f"{to} has too much unread; try again later")
        elif not self._connected():
            self._refuse(connection, msg_id, "offline", f"{to} is not connected")
        elif self.inflight >= self.config.max_inflight:
            self._refuse(connection, msg_id, "busy", "too many messages in flight; try later")
        else:
            payload = out[protocol.LENGTH_BYTES:]  # the node holding `to` frames it again
            self.inflight += 1
            connection.flight_started()
            self._spawn(self._deliver_elsewhere(connection, to, msg_id, payload))

    def _refuse(self, connection: Connection, msg_id: Any, code: str, message: str) -> None:
        """An error about one message; the connection stays."""
        self.stats["messages_offline" if code == "offline" else "messages_refused"] += 1
        connection.send({"type": "error", "code": code, "id": msg_id, "message": message})

    # -- across nodes -----------------------------------------------------------------

    def _connected(self) -> bool:
        # While NATS is away, nothing is subscribed or published: nats-py would buffer a
        # SUB and send it after the reconnect even if we unsubscribed meanwhile, leaving a
        # subscription nobody owns. `resync` catches up after the reconnect instead.
        return self.nc is not None and self.nc.is_connected

    async def _deliver_elsewhere(self, sender: Connection, to: str, msg_id: Any,
                                 payload: bytes) -> None:
        try:
            reply = await self.nc.request(USER_SUBJECT.format(uid=to),
                                          payload, timeout=self.config.delivery_timeout)
        except NoRespondersError:
            self._refuse(sender, msg_id, "offline", f"{to} is not connected")
            return
        except NatsTimeoutError:
            self._refuse(sender, msg_id, "timeout", f"could not reach {to} in time")
            return
        except Exception as exc:  # closed, draining, buffer full: NATS cannot take it now
            self._refuse(sender, msg_id, "unavailable", f"could not reach {to}: {exc}")
            return
        finally:
            self.inflight -= 1
            sender.flight_ended()
        if reply.data == b"ok":
            self.stats["messages_delivered"] += 1
            sender.send({"type": "ack", "id": msg_id})
        elif reply.data == b"busy":
            self._refuse(sender, msg_id, "recipient_busy",
                         f"{to} has too much unread; try again later")
        else:
            self._refuse(sender, msg_id, "offline", f"{to} is not connected")

    async def _subscribe(self, uid: str) -> None:
        subscription = await self.nc.subscribe(USER_SUBJECT.format(uid=uid),
                                               cb=self._on_user_message)
        if self.sessions.get(uid) is None or uid in self._subscriptions:
            await subscription.unsubscribe()  # gone (or subscribed again) meanwhile
        else:
            self._subscriptions[uid] = subscription

    async def _on_user_message(self, msg: Any) -> None:
        uid = msg.subject.split(".")[2]
        local = self.sessions.get(uid)
        if local is None or len(msg.data) > protocol.MAX_FRAME:
            await msg.respond(b"offline")
        elif local.deliver(len(msg.data).to_bytes(protocol.LENGTH_BYTES, "big") + msg.data):
            await msg.respond(b"ok")
        else:
            await msg.respond(b"busy")

    def _announce(self, connection: Connection) -> None:
        """Tell the other nodes: this uid logged in here, with this stamp."""
        if self._connected():
            notice = logins.encode_notice(connection.uid, connection.login)
            self._spawn(self.nc.publish(LOGIN_SUBJECT, notice))

    async def _on_login(self, msg: Any) -> None:
        """Another node's login of a uid: a copy held here yields to a newer one, and
        answers an older one with its own notice, so that node learns it lost even if it
        missed ours. Every notice moves the clock, so a later login here outranks it."""
        try:
            uid, stamp = logins.decode_notice(msg.data)
        except BadNotice as exc:
            log.warning("ignoring a login notice: %s", exc)
            return
        if stamp.node == self.config.node_id:
            return  # our own, echoed back
        self.clock.observe(stamp)
        local = self.sessions.get(uid)
        if local is None:
            return
        if logins.judge(local.login, stamp) is Verdict.YIELD:
            self._replace(local)
        else:
            self._announce(local)

    def _spawn(self, coroutine: Coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed: %r", task.exception())

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
            "inflight": self.inflight,
            **self.stats,
        }
