"""Running imnodes and raw sockets in tests."""

import asyncio
import contextlib
import signal
import subprocess
import sys

from imnode import protocol
from imnode.server import Node, NodeConfig


@contextlib.asynccontextmanager
async def running_node(node_id="n1", nc=None, **options):
    node = Node(NodeConfig(node_id=node_id, **options), nc)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


class RawSocket:
    """A client that speaks bytes, to send what the reference client never would."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, node):
        return cls(*await asyncio.open_connection(*node.address))

    def send(self, frame):
        self.writer.write(protocol.encode(frame))

    def send_bytes(self, data):
        self.writer.write(data)

    async def frame(self, timeout=5.0):
        async def read():
            length = int.from_bytes(await self.reader.readexactly(4), "big")
            return protocol.decode(await self.reader.readexactly(length))

        return await asyncio.wait_for(read(), timeout)

    async def closed(self, timeout=5.0):
        """True once the server closed the connection (EOF)."""
        data = await asyncio.wait_for(self.reader.read(), timeout)
        return data == b""

    def close(self):
        self.writer.close()


@contextlib.contextmanager
def imnode_process(node_id, nats_url, *args, env=None):
    """A real `imnode serve` process listening on a free port; yields (process, address).
    `env` replaces the environment (e.g. PYTHONPATH with a sitecustomize that skews time)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "imnode", "serve", "--id", node_id, "--listen", "127.0.0.1:0",
         "--nats", nats_url, "--capacity", "100", "--log-level", "warning", *args],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"imnode {node_id} listening on 127.0.0.1:"), line
        yield process, ("127.0.0.1", int(line.split(":")[1].split(",")[0]))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # in case a test left it stopped
            process.kill()
        process.wait()
