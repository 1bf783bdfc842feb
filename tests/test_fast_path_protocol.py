"""The fast path's protocol where it differs from Sanic's in how, not what: its
connection set-up, and a client that sends requests faster than it reads the answers.
(That it answers what Sanic's route answers is tests/test_fast_path.py's proof.)"""

import socket
import time

import pytest
import uvloop
from sanic import Sanic
from sanic.server.protocols.http_protocol import HttpProtocol

from dispatcher.config import HttpConfig
from dispatcher.fast_path import FastProtocol, protocol_for
from dispatcher.http_server import GuardedProtocol
from tests.test_dispatcher_e2e import Cluster


def fields(protocol):
    values = {}
    for cls in type(protocol).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(protocol, name):
                values[name] = getattr(protocol, name)
    return values


def test_a_connection_is_set_up_with_what_sanic_sets():
    """The slim `__init__` leaves every field Sanic's would, with the same values (a
    Sanic upgrade that adds one fails here)."""
    app = Sanic("setup_parity")
    app.config.REQUEST_TIMEOUT, app.config.KEEP_ALIVE_TIMEOUT = 7, 11
    loop = uvloop.new_event_loop()
    try:
        options = {"loop": loop, "app": app, "connections": set(), "state": {}}
        theirs, ours = fields(HttpProtocol(**options)), fields(FastProtocol(**options))
        ours = {name: value for name, value in ours.items() if name in theirs}
        assert ours.keys() == theirs.keys()
        for name, value in theirs.items():
            if name in ("_can_write", "_data_received"):
                assert ours[name].is_set() is value.is_set(), name
            elif name != "signal":
                assert ours[name] == value, name
        assert ours["request_timeout"] == 7 and ours["keep_alive_timeout"] == 11
    finally:
        loop.close()


def test_the_configuration_chooses_the_protocol():
    assert protocol_for(HttpConfig()) is FastProtocol
    assert protocol_for(HttpConfig(fast_path=False)) is GuardedProtocol


@pytest.fixture
def cluster(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url, capacity=10_000_000)  # never full here
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        yield running
    finally:
        running.stop()


def test_a_client_that_never_reads_its_answers_is_closed_and_others_are_served(cluster):
    """Pipelined get-tcp-ip, answers never read: the fast path stops answering once its
    answers wait unsent, stops reading, and the connection is closed once its writes make
    no progress for the request timeout (10 s), as Sanic's connections are."""
    request = b"GET /get-tcp-ip?uid=u1 HTTP/1.1\r\nHost: x\r\n\r\n"
    flood = socket.socket()
    flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before the handshake
    flood.connect(("127.0.0.1", cluster.http_port))
    flood.setblocking(False)
    closed_after, blocked, started = None, 0, time.monotonic()
    try:
        while time.monotonic() - started < 35:
            try:
                flood.send(request * 256)
            except BlockingIOError:  # the server stopped reading: wait
                blocked += 1
                time.sleep(0.2)
                assert cluster.get("/get-tcp-ip?uid=other")[0] == 200
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
    finally:
        flood.close()
    assert blocked, "the server never stopped reading"
    assert closed_after is not None, "still open after 35 s"
    assert 9 < closed_after < 32, closed_after  # 10 s without progress, twice at most


def test_a_long_pipelined_burst_is_answered_in_order_through_a_hand_over(cluster):
    """2,000 pipelined get-tcp-ip (their answers stall the writes now and then), then a
    request for Sanic, then get-tcp-ip again: every answer, in order."""
    fast = b"GET /get-tcp-ip?uid=u1 HTTP/1.1\r\nHost: x\r\n\r\n"
    stream = fast * 2000 + b"GET /healthz HTTP/1.1\r\n\r\n" + fast.replace(b"1.1", b"1.0")
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=15) as sock:
        sock.sendall(stream)
        answer = b""
        while chunk := sock.recv(1 << 16):  # the HTTP/1.0 request closes the connection
            answer += chunk
    bodies = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        bodies.append((head.split(b" ")[1], rest[:size]))
        answer = rest[size:]
    assert len(bodies) == 2002
    assert all(status == b"200" and b'"node"' in body for status, body in bodies[:2000])
    assert bodies[2000] == (b"200", b'{"status":"alive"}')
    assert bodies[2001][0] == b"200" and b'"node"' in bodies[2001][1]


class Answers:
    """A stand-in for `GetTcpIp`: the protocol's flow control is under test here."""

    per_address = None

    def answer(self, query, address):
        return 200, b'{"node":"n1","ip":"127.0.0.1","port":1}', 0


class Transport:
    """Records what the protocol does to it; `pause_at`: the write that fills its buffer."""

    def __init__(self):
        self.reading, self.closing, self.writes, self.pause_at = True, False, 0, None
        self.protocol = None

    def write(self, data):
        self.writes += 1
        self.last = data
        if self.writes == self.pause_at:
            self.protocol.pause_writing()

    def get_write_buffer_size(self):
        return 70_000

    def is_reading(self):
        return self.reading

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def is_closing(self):
        return self.closing

    def close(self):
        self.closing = True

    abort = close

    def set_write_buffer_limits(self, **limits):
        pass

    def get_extra_info(self, name, default=None):
        return default


def test_reading_resumes_when_the_last_buffered_answer_was_the_one_that_stalled():
    """A burst that paused reading (64 kB of requests buffered while the writes were
    stalled), answered to its very last request before the writes stall again: once the
    client has read, reading resumes (the red team's deadlock_unit.py: it stayed paused,
    and the connection hung)."""
    app = Sanic("flow_control")
    app.ctx.get_tcp_ip = Answers()
    request = b"GET /get-tcp-ip HTTP/1.1\r\n\r\n"
    loop = uvloop.new_event_loop()
    try:
        protocol = FastProtocol(loop=loop, app=app, connections=set())
        transport = Transport()
        transport.protocol, transport.pause_at = protocol, 1
        protocol.connection_made(transport)
        protocol.data_received(request)  # its answer stalls the writes
        protocol.data_received(request * 2400)  # 67 kB held: reading pauses
        assert not transport.reading and transport.writes == 1
        transport.pause_at = 1 + 2400
        protocol.resume_writing()  # all answered, the last one stalls again
        assert transport.writes == 2401 and not protocol.recv_buffer
        protocol.resume_writing()  # the client read them
        assert transport.reading
        protocol.connection_lost(None)
    finally:
        loop.close()


def test_keep_alive_turned_off_in_sanic_closes_after_each_answer():
    """`SANIC_KEEP_ALIVE=false` (Sanic's KEEP_ALIVE): one answer per connection, saying
    so, as Sanic's route does (the red team's F4: the fast path kept it alive)."""
    app = Sanic("no_keep_alive")
    app.config.KEEP_ALIVE = False
    app.ctx.get_tcp_ip = Answers()
    loop = uvloop.new_event_loop()
    try:
        protocol = FastProtocol(loop=loop, app=app, connections=set())
        transport = Transport()
        transport.protocol = protocol
        protocol.connection_made(transport)
        protocol.data_received(b"GET /get-tcp-ip HTTP/1.1\r\n\r\n" * 2)
        assert transport.writes == 1 and transport.closing
        assert b"\r\nconnection: close\r\n" in transport.last
        protocol.connection_lost(None)
    finally:
        loop.close()
