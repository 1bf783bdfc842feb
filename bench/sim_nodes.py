"""Lightweight simulated imnodes for the poll benchmark: one NATS connection answering
`imnode.<id>.status` for many ids with a fixed, valid status reply, in a process of its
own so that the dispatcher's measured cycle does not include the answering."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import nats
import orjson


def status(node_id: str) -> bytes:
    return orjson.dumps({
        "node_id": node_id, "ip": "127.0.0.1", "port": 9000, "connections": 10,
        "capacity": 10_000, "accepting": True, "draining": False, "cpu": 0.01,
        "loop_lag_ms": 0.1, "uptime_s": 10.0, "version": "0.1.0", "ts": 1.8e9,
    })


async def simulate(url: str, node_ids: list[str]) -> Any:
    """Connect and answer for every node id; returns the connection (close it to stop)."""
    nc = await nats.connect(url)
    replies = {node_id: status(node_id) for node_id in node_ids}

    async def answer(msg: Any) -> None:
        await msg.respond(replies[msg.subject.split(".")[1]])

    await nc.subscribe("imnode.*.status", cb=answer)
    await nc.flush()
    return nc


async def _serve(url: str, count: int) -> None:
    nc = await simulate(url, [f"sim{i}" for i in range(count)])
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    await nc.close()


if __name__ == "__main__":  # python -m bench.sim_nodes URL COUNT: answers in its own process
    asyncio.run(_serve(sys.argv[1], int(sys.argv[2])))
