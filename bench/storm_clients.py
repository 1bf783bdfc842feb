"""The clients of the reconnect-storm scenario, in a process of their own.

    python -m bench.storm_clients DISPATCHER_URL HOST PORT COUNT TIMEOUT_S

Connects COUNT reference clients straight to HOST:PORT (the node that will die), prints
`ready COUNT`, then waits. When the node dies each client asks the dispatcher where to go
(as a phone does: at once, then after every 503's Retry-After) and reconnects. Once all
have reconnected, or TIMEOUT_S after the first loss, it prints one JSON line: when each
client was handed to which node (seconds after the first loss), the refusals, how many got
back, and the CPU time this process used meanwhile (one process plays all the phones, so
on a small machine it can be what limits the pace).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence

import orjson

from imnode.client import Address, ClientError, ImClient, dispatcher_locator


async def main(url: str, host: str, port: int, count: int, timeout: float) -> None:
    assignments: list[tuple[float, Address]] = []
    refusals: list[float] = []
    lost = asyncio.Event()
    first_loss: list[float] = []

    def locator(uid: str):
        ask = dispatcher_locator(url, uid, timeout=10)

        async def locate(exclude: Sequence[str]) -> Address:
            if not first_loss:
                first_loss.append(time.monotonic())
                lost.set()
            try:
                address = await ask(exclude)
            except ClientError as exc:
                if exc.code == "http_503":
                    refusals.append(time.monotonic())
                raise
            assignments.append((time.monotonic(), address))
            return address

        return locate

    clients = [ImClient(f"storm-{i}", locate=locator(f"storm-{i}"),
                        reconnect_attempts=1000) for i in range(count)]
    for start in range(0, count, 500):  # in waves, to stay within the listen backlog
        await asyncio.gather(*(client.connect((host, port)) for client in
                               clients[start:start + 500]))
    print(f"ready {count}", flush=True)
    await lost.wait()
    cpu = time.process_time()
    deadline = first_loss[0] + timeout
    while time.monotonic() < deadline and sum(c.reconnects > 0 for c in clients) < count:
        await asyncio.sleep(0.05)
    t0 = first_loss[0]
    result = {
        "clients": count,
        "reconnected": sum(client.reconnects > 0 for client in clients),
        "assignments": [[round(t - t0, 4), f"{ip}:{port}"] for t, (ip, port) in assignments],
        "refusals": [round(t - t0, 4) for t in refusals],
        "cpu_s": time.process_time() - cpu,  # near the wall time: the swarm is the limit
    }
    print(orjson.dumps(result).decode(), flush=True)
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


if __name__ == "__main__":
    url, host, port, count, timeout = sys.argv[1:6]
    asyncio.run(main(url, host, int(port), int(count), float(timeout)))
