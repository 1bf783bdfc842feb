"""Lightweight simulated imnodes for the poll benchmark: one NATS connection answering
`imnode.<id>.status` for many ids with a fixed, valid status reply."""

from __future__ import annotations

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
