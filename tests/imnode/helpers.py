"""Running imnodes and raw sockets in tests."""

import asyncio
import contextlib

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
