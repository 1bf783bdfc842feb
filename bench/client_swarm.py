"""Many idle imnode clients in one process, for the connection-capacity benchmark.

    python -m bench.client_swarm HOST PORT COUNT HEARTBEAT_S

Connects COUNT clients (hello, then a ping every HEARTBEAT_S), prints `ready N` once all
are connected, and keeps them until its standard input closes, then `bye`. One task pings
for all clients, as a phone keeps one timer per app, not per socket.
"""

from __future__ import annotations

import asyncio
import sys

from imnode import protocol

PING = protocol.encode({"type": "ping"})


class Idle(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.welcomed = asyncio.get_running_loop().create_future()
        self.reader = protocol.FrameReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for frame in self.reader.feed(data):
            if not self.welcomed.done():
                self.welcomed.set_result(frame)


async def main(host: str, port: int, count: int, heartbeat: float) -> None:
    loop = asyncio.get_running_loop()
    clients: list[Idle] = []
    for start in range(0, count, 500):  # in waves, to stay within the listen backlog
        wave = []
        for i in range(start, min(start + 500, count)):
            _, client = await loop.create_connection(Idle, host, port)
            client.transport.write(protocol.encode({"type": "hello", "uid": f"idle-{i}"}))
            wave.append(client)
        for client in wave:
            frame = await asyncio.wait_for(client.welcomed, 30)
            if frame["type"] != "welcome":
                raise SystemExit(f"refused: {frame}")
        clients += wave
    print(f"ready {len(clients)}", flush=True)

    async def heartbeats() -> None:
        while True:
            await asyncio.sleep(heartbeat)
            for client in clients:
                client.transport.write(PING)

    pinger = loop.create_task(heartbeats())
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    pinger.cancel()
    for client in clients:
        client.transport.close()
    print("bye", flush=True)


if __name__ == "__main__":
    host, port, count, heartbeat = sys.argv[1:5]
    asyncio.run(main(host, int(port), int(count), float(heartbeat)))
