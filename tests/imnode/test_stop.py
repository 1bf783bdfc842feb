"""How a real `imnode serve --metrics-listen` stops on SIGTERM: exit code 0, and bounded
whatever NATS is doing at that moment.

A stop once took 10 s: SIGTERM came while the NATS link was still starting, inside the
micro service's flush; the stop cancelled that flush, nats-py's read loop died on the
PONG meant for it, and every flush of the drain that followed waited out its 10 s. The
proxy below holds NATS's PONGs back to put a node exactly there (and, in another test,
to stand for a NATS server that stopped answering).
"""

import asyncio
import contextlib
import http.client
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import nats
import pytest

from tests.nats_server import free_port

EXIT_WITHIN = 8.0  # seconds; the stop is bounded to about 3 s, nats-py's flush to 10 s


class PongHoldingProxy:
    """A TCP proxy to NATS that can hold the server's PONGs back (and what follows them).

    It follows the protocol just enough to find PINGs and PONGs between messages:
    `(H)MSG` from the server and `(H)PUB` from the client carry their payload sizes.
    """

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pings = 0  # PINGs the client sent
        self.pongs = 0  # PONGs the server sent
        self.hold_pong = None  # hold the server's PONG number n (1: the connect's) ...
        self.holding = threading.Event()  # ... set while it is held
        self.released = threading.Event()
        self.changed = threading.Condition()
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.port}"

    def hold(self, pong_number=None):
        """Hold the server's PONG number `pong_number` back (None: the next one)."""
        with self.changed:
            self.released.clear()
            self.holding.clear()
            self.hold_pong = self.pongs + 1 if pong_number is None else pong_number

    def release(self):
        self.released.set()

    def wait_pings(self, count, timeout=10.0):
        with self.changed:
            return self.changed.wait_for(lambda: self.pings >= count, timeout)

    def close(self):
        self.release()
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(server, client, "MSG"), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, "PUB"), daemon=True).start()

    def _pump(self, source, target, carrier):
        reader = source.makefile("rb")
        try:
            while line := reader.readline():
                verb = line.split(b" ", 1)[0].strip().upper()
                if verb in (carrier.encode(), b"H" + carrier.encode()):
                    line += reader.read(int(line.split()[-1]) + 2)  # payload and CRLF
                elif verb == b"PING" and carrier == "PUB":
                    with self.changed:
                        self.pings += 1
                        self.changed.notify_all()
                elif verb == b"PONG" and carrier == "MSG":
                    with self.changed:
                        self.pongs += 1
                        held = self.pongs == self.hold_pong
                    if held:
                        self.holding.set()
                        self.released.wait()
                target.sendall(line)
        except (OSError, ValueError):
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def imnode(node_id, nats_url, metrics_port):
    process = subprocess.Popen(
        [sys.executable, "-m", "imnode", "serve", "--id", node_id, "--listen", "127.0.0.1:0",
         "--nats", nats_url, "--capacity", "10", "--drain-window", "0.2",
         "--drain-timeout", "2", "--metrics-listen", f"127.0.0.1:{metrics_port}",
         "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"imnode {node_id} listening on 127.0.0.1:"), line
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def stopped(process, signalled=False):
    """SIGTERM (unless `signalled` already), then (exit code, stderr)."""
    if not signalled:
        process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"no exit {EXIT_WITHIN:g} s after SIGTERM; its log:\n{stderr[-3000:]}")
    return process.returncode, stderr


def scrape(port, timeout=10.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        return reply.read()


def wait_for_status(url, node_id):
    async def ask():
        nc = await nats.connect(url)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    return await nc.request(f"imnode.{node_id}.status", b"", timeout=0.5)
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    assert time.monotonic() < deadline, "no status reply in 10 s"
                    await asyncio.sleep(0.05)
        finally:
            await nc.close()

    return asyncio.run(ask())


@contextlib.contextmanager
def scrapes_in_flight(port, threads=3):
    """Scrape /metrics without pause from a few threads; yields the count of scrapes."""
    done = threading.Event()
    count = [0]

    def scraping():
        while not done.is_set():
            try:
                scrape(port)
            except (OSError, http.client.HTTPException):  # refused or cut off: stopping
                return
            count[0] += 1

    workers = [threading.Thread(target=scraping, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield count
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=15)


def test_sigterm_with_scrapes_in_flight_exits_0(nats_server):
    port = free_port()
    with imnode("stop1", nats_server.url, port) as process:
        wait_for_status(nats_server.url, "stop1")
        with scrapes_in_flight(port) as count:
            deadline = time.monotonic() + 10
            while count[0] < 3:  # the scrapers are going
                assert time.monotonic() < deadline
                time.sleep(0.01)
            code, stderr = stopped(process)
    assert code == 0, stderr[-3000:]
    with pytest.raises(OSError):  # and the metrics port is closed
        scrape(port, timeout=2)


def test_sigterm_during_the_nats_links_start_does_not_wait_out_a_flush(nats_server):
    """SIGTERM while the micro service's start waits for its flush's PONG: the stop must
    not cancel that flush (its PONG would then kill nats-py's read loop, and the drain's
    flushes would each wait 10 s for PONGs nobody reads)."""
    proxy = PongHoldingProxy(nats_server.port)
    proxy.hold(pong_number=2)  # 1 is the connect's; 2 answers the service start's flush
    try:
        port = free_port()
        with imnode("stop2", proxy.url, port) as process:
            assert proxy.holding.wait(10), "the node never flushed"
            scrape(port)
            with scrapes_in_flight(port):
                process.send_signal(signal.SIGTERM)
                # the stop has moved on to draining NATS (its flushes PING) or is done
                proxy.wait_pings(3, timeout=3)
                proxy.release()
                code, stderr = stopped(process, signalled=True)
    finally:
        proxy.close()
    assert code == 0, stderr[-3000:]
    assert "InvalidStateError" not in stderr, stderr[-3000:]


def test_sigterm_while_nats_does_not_answer_is_bounded(nats_server):
    """A NATS server that stopped answering (PONGs held back for good) must not hold the
    stop: nats-py would wait 10 s per flush and 30 s for its drain."""
    proxy = PongHoldingProxy(nats_server.port)
    try:
        port = free_port()
        with imnode("stop3", proxy.url, port) as process:
            wait_for_status(nats_server.url, "stop3")
            proxy.hold()  # from now on the node gets no PONG
            with scrapes_in_flight(port):
                code, stderr = stopped(process)
    finally:
        proxy.close()
    assert code == 0, stderr[-3000:]
